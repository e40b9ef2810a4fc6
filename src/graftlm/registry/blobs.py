"""A content-addressed folder of files: each file is stored once, named by the sha256 of its bytes.

A blob appears under its final name only once its bytes are on disk (written to a temporary file,
fsynced, then renamed), so a crash leaves either no blob or a complete one, plus at most a stray
temporary file that `sweep` removes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from graftlm.fileio import file_sha256
from graftlm.registry.records import SHA256, RegistryError, check_sha256

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
        """Where blob `sha` lives; anything but 64 lowercase hex is refused, never joined into a path."""
        check_sha256(sha, "blob")
        return self.root / sha[:2] / sha[2:]

    def has(self, sha: str) -> bool:
        """Whether blob `sha` is here as a regular file (a link in its place does not count)."""
        try:
            return stat.S_ISREG(self.path(sha).lstat().st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

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
        return self.has(sha) and file_sha256(self.path(sha)) == sha

    def delete(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)

    def all(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            if len(d.name) == 2 and d.is_dir():
                for f in d.iterdir():
                    if SHA256.fullmatch(d.name + f.name):  # a stray file is no blob: gc and verify skip it
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
        """Place blob `sha` at `dest`: a hard link where the file system allows, else a copy. Never follows
        a link at either end, and never replaces what is already at `dest`."""
        src = self.path(sha)
        if not self.has(sha) or src.resolve() != self.root.resolve() / sha[:2] / sha[2:]:
            raise RegistryError(f"blob {sha[:12]}... is missing or not a regular file in {self.root}")
        try:
            os.link(src, dest, follow_symlinks=False)
            return
        except FileExistsError as e:
            raise RegistryError(f"{dest} already exists; refusing to replace it") from e
        except OSError:
            pass  # another file system, or one without hard links: copy
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            fd = os.open(dest, flags, 0o444)
        except FileExistsError as e:
            raise RegistryError(f"{dest} already exists; refusing to replace it") from e
        with os.fdopen(fd, "wb") as out, src.open("rb") as f:
            shutil.copyfileobj(f, out, CHUNK)
