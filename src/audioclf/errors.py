"""The one error type, in a leaf module so that every module, config.py included, can raise it."""


class AudioclfError(ValueError):
    """The one error type of audioclf: its message says what was wrong and what is allowed."""
