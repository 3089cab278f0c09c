"""The one error type for problems a user can fix: bad data, a bad option, a folder that is not an artifact.

Entry points print these as one line and exit 2. Every other exception is a bug (ours, TensorFlow's or
Ray's) and keeps its traceback.
"""


class DigitsError(Exception):
    """Something the user can fix; the message says what was wrong and what is accepted."""


class ConfigError(DigitsError, ValueError):
    """A bad option or hyperparameter (also a ``ValueError``, as Python code expects of bad arguments)."""
