"""Feedback, from the like button to the training set: the store and its migrations, the
redaction every stored text goes through, the trust gate (review), exports as TRL data, the
copies they leave (derived), retention and erasure, and the Insights numbers.

The app (`supportlm.serve`) writes to it and the command line (`supportlm.cli.feedback`)
reads it; it imports neither, nor `supportlm.train` (tests/test_layout.py).
"""
