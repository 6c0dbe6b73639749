"""Judging: base against tuned (or new against old) on held-out questions; metrics, report."""
