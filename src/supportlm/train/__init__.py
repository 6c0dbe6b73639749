"""Training: configuration, data, the trainer, evaluation, metrics and merging (`finetune/*.py`)."""
