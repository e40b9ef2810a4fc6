"""`Registry.verify`: every problem in the index, the blobs and the built adapter folders under tree/.

A built folder is what serving loads, so it is checked as strictly as the blobs: it must belong to a
live version and hold exactly that version's files, as regular files (never links) of the right size
and, when rehashing, the right sha256.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from graftlm.fileio import file_sha256
from graftlm.registry import index
from graftlm.registry.records import (
    REQUIRED,
    SHA256,
    RegistryError,
    Version,
    check_name,
    check_relpath,
    check_sha256,
    check_size,
    check_version_number,
)

if TYPE_CHECKING:
    from graftlm.registry.store import Registry


def problems(reg: Registry, rehash: bool = True) -> list[str]:
    """Missing or altered files, invalid index rows, aliases at missing versions, a damaged index, and
    stray, altered or linked entries under tree/. `rehash=False` checks presence and sizes only."""
    found: list[str] = []
    with reg.db() as db:
        check = db.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            found.append(f"index: {check}")
        versions = index.versions(db)
        aliases = index.aliases(db)
    live = {(v.name, str(v.version)): v for v in versions}
    for v in versions:
        found += _version_problems(reg, v, rehash)
    for (name, a), number in aliases.items():
        if (name, str(number)) not in live:
            found.append(f"{name}@{a} points at missing version {number}")
    return found + _tree_problems(reg, live, rehash)


def _version_problems(reg: Registry, v: Version, rehash: bool) -> list[str]:
    found = []
    try:
        check_name(v.name, "index: name")
        check_version_number(v.version, f"index: {v.name}: version")
    except RegistryError as e:
        found.append(str(e))
    for rel, f in sorted(v.files.items()):
        try:
            check_relpath(rel, f"index: {v.ref}: {rel!r}")
            check_sha256(f.sha256, f"index: {v.ref}: {rel!r}")
            check_size(f.size, f"index: {v.ref}: {rel!r}")
        except RegistryError as e:
            found.append(str(e))
            continue
        if not reg.blobs.has(f.sha256):
            found.append(f"{v.ref}: {rel} is missing")
        elif rehash and not reg.blobs.verify(f.sha256):
            found.append(f"{v.ref}: {rel} does not match its sha256")
        elif (size := reg.blobs.path(f.sha256).stat().st_size) != f.size:
            found.append(f"{v.ref}: {rel} has {size} bytes, not the {f.size} the index records")
    if not all(r in v.files for r in REQUIRED):
        found.append(f"{v.ref}: incomplete (lacks {', '.join(r for r in REQUIRED if r not in v.files)})")
    return found


def _tree_problems(reg: Registry, live: dict[tuple[str, str], Version], rehash: bool) -> list[str]:
    """tree/NAME/VERSION must be a real folder of a live version; hidden entries are the leftovers of an
    interrupted checkout, which gc removes."""
    if not reg.trees.is_dir():
        return []
    found = []
    for d in sorted(reg.trees.iterdir()):
        where = f"tree/{d.name}"
        if d.is_symlink():
            found.append(f"{where} is a link")
            continue
        if not d.is_dir():
            found.append(f"{where} is a stray file")
            continue
        for t in sorted(d.iterdir()):
            at = f"{where}/{t.name}"
            if t.is_symlink():
                found.append(f"{at} is a link")
            elif t.name.startswith("."):
                continue
            elif not t.is_dir():
                found.append(f"{at} is a stray file")
            elif (d.name, t.name) not in live:
                found.append(f"{at} is the folder of no version (stray; gc removes it)")
            else:
                found += _folder_problems(reg, t, live[d.name, t.name], rehash, at)
    return found


def _folder_problems(reg: Registry, folder: Path, v: Version, rehash: bool, where: str) -> list[str]:
    found = []
    files: dict[str, os.stat_result] = {}
    links = set()
    for top, dirs, names in os.walk(folder):  # walk does not descend into links to folders
        for n in dirs + names:
            p = Path(top) / n
            rel, st = p.relative_to(folder).as_posix(), p.lstat()
            if stat.S_ISLNK(st.st_mode):
                found.append(f"{where}/{rel} is a link")
                links.add(rel)
            elif stat.S_ISREG(st.st_mode):
                files[rel] = st
            elif not stat.S_ISDIR(st.st_mode):
                found.append(f"{where}/{rel} is not a regular file")
    found += [f"{where}/{rel} is missing" for rel in sorted(set(v.files) - set(files) - links)]
    found += [f"{where}/{rel} is not a file of {v.ref}" for rel in sorted(set(files) - set(v.files))]
    for rel in sorted(set(files) & set(v.files)):
        f, st = v.files[rel], files[rel]
        if st.st_size != f.size:
            found.append(f"{where}/{rel} has {st.st_size} bytes, not the {f.size} of {v.ref}")
        elif rehash and not _same_file(reg, f.sha256, st) and file_sha256(folder / rel) != f.sha256:
            found.append(f"{where}/{rel} does not match its sha256")
    return found


def _same_file(reg: Registry, sha: str, st: os.stat_result) -> bool:
    """Whether a built file is a hard link to its blob, which the blob check has already rehashed."""
    if not SHA256.fullmatch(sha) or not reg.blobs.has(sha):
        return False
    blob = reg.blobs.path(sha).stat()
    return (blob.st_dev, blob.st_ino) == (st.st_dev, st.st_ino)
