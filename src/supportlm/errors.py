"""User-facing errors.

A `SupportLMError` is a failure the user can fix (a missing file, an unknown data shape, an adapter
trained on another base model…). Its message is one clear sentence. Entry points print it without a
traceback and exit with status 2; anything else is a bug and keeps its traceback.
"""


class SupportLMError(Exception):
    """A user-facing failure, explained in one sentence."""
