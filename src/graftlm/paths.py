"""Where graftlm keeps what it makes once and reuses: converted models and compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$GRAFTLM_CACHE`, else `$XDG_CACHE_HOME/graftlm`, else `~/.cache/graftlm`."""
    env = os.environ.get("GRAFTLM_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "graftlm"
