"""Small C kernels compiled on first use with the system compiler and loaded through ctypes.

Each kernel is built once per source, flags and compiler version into graftlm's cache
(`kernels/NAME-HASH.so`). Without a compiler, after a failed build, or with GRAFTLM_NO_KERNEL=1,
`compile_library` returns None and callers use their PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# reassociation lets the compiler vectorize dot products (sums then differ from a sequential loop in the
# last bits only)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
CFLAGS += ["-shared", "-fPIC", "-std=c11"]


def compile_library(name: str, source: str) -> ctypes.CDLL | None:
    """The shared library built from `source` (cached), or None when no kernel can be had."""
    if os.environ.get("GRAFTLM_NO_KERNEL"):
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        log.warning("no C compiler found: the %s kernel is replaced by a slower PyTorch path", name)
        return None
    from graftlm.model.catalog import cache_root

    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256((source + " ".join(CFLAGS) + version).encode()).hexdigest()[:16]
    lib = cache_root() / "kernels" / f"{name}-{key}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
            src.write_text(source)
            done = subprocess.run([cc, *CFLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
            if done.returncode != 0:
                log.warning("compiling the %s kernel failed; using the PyTorch path:\n%s", name, done.stderr[-2000:])
                return None
            os.replace(out, lib)
    return ctypes.CDLL(str(lib))
