"""Fitting: the training configuration, the trainer, the run and the folder it leaves."""
