"""The errors graftlm raises for bad input; each message says what was wrong and what to do."""


class GraftlmError(Exception):
    """Base class for every error caused by the user's input rather than by a bug."""


class ConfigError(GraftlmError, ValueError):
    """A setting or argument outside what it may be (a ValueError too, as Python's own checks raise)."""


class UnknownModelError(GraftlmError):
    """A model name that is neither in the catalog nor an existing path."""


class UnsupportedModelError(GraftlmError):
    """A checkpoint whose architecture or feature graftlm does not implement."""


class CorruptModelError(GraftlmError):
    """A model file that is truncated, malformed or inconsistent with its config."""


class PromptTooLongError(GraftlmError):
    """A prompt that does not fit in the model's context window."""
