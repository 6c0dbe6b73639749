"""Summarisation (`summarize`) and translation (`translate`) of long texts on top of any `Engine`.

`common` holds what both share: cutting text by tokens at good boundaries, token usage over many
model calls, monotonic progress.
"""
