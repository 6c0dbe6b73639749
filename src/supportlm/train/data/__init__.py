"""Data: read records into examples, clean, weigh, sample and split them, and report it."""
