"""A content-addressed folder of files: each file is stored once, named by the sha256 of its bytes.

A blob appears under its final name only once its bytes are on disk (written to a temporary file,
fsynced, then renamed), so a crash leaves either no blob or a complete one, plus at most a stray
temporary file that `sweep` removes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from graftlm.fileio import file_sha256

CHUNK = 1 << 22


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: Path):
        self.root = root
        self.tmp = root / ".tmp"

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha[2:]

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def put(self, source: Path) -> tuple[str, int]:
        """Copy a file in, hashing it on the way; returns (sha256, size). A blob already there is kept."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        fd, name = tempfile.mkstemp(dir=self.tmp)
        tmp = Path(name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = h.hexdigest()
            final = self.path(sha)
            if final.is_file():
                return sha, size
            final.parent.mkdir(exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return sha, size
        finally:
            tmp.unlink(missing_ok=True)

    def verify(self, sha: str) -> bool:
        p = self.path(sha)
        return p.is_file() and file_sha256(p) == sha

    def delete(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)

    def all(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            if len(d.name) == 2 and d.is_dir():
                for f in d.iterdir():
                    yield d.name + f.name

    def sweep(self) -> int:
        """Remove temporary files left by a crashed write; returns how many."""
        if not self.tmp.is_dir():
            return 0
        n = 0
        for f in self.tmp.iterdir():
            if f.is_dir():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)
            n += 1
        return n

    def link(self, sha: str, dest: Path) -> None:
        """Place blob `sha` at `dest`: a hard link where the file system allows, else a copy."""
        try:
            os.link(self.path(sha), dest)
        except OSError:
            shutil.copyfile(self.path(sha), dest)
