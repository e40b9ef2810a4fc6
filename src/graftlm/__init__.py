"""graftlm: one small language model, many small task adapters."""

from graftlm.errors import GraftlmError

__version__ = "0.1.0"
__all__ = ["GraftlmError", "__version__"]
