"""A bundle's manifest.json: read it (refusing links), check its signature, and check every field.

A bundle may come from anyone, so nothing in it is used before it is checked here: every name,
version, alias, file path, hash and size (see `records`), the types of the rest, and that the manifest
agrees with itself. A malformed manifest is a RegistryError naming the bundle and the field.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graftlm.registry import signing
from graftlm.registry.records import Ref, RegistryError, Version, check_alias, check_sha256, check_size

FORMAT = "graftlm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MAX_MANIFEST = 64 * 2**20


@dataclass(frozen=True)
class Entry:
    """One adapter version a bundle carries, and the aliases it points at that version."""

    version: Version
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    created: float
    since: tuple[str, ...]  # the versions a delta bundle was made since
    adapters: tuple[Entry, ...]
    files: dict[str, int]  # sha256 -> size of every file the bundle holds
    signed: bool  # whether the bundle has a manifest.sig
    signed_by: str | None  # fingerprint of the trusted key whose signature was checked; None if none was


def open_regular(path: Path, where: str) -> tuple[int, int]:
    """Open a bundle's file for reading, refusing links and anything but a regular file; (fd, size)."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            raise RegistryError(f"{where}: {path.name} is a link or not a regular file; refused")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError as e:
        raise RegistryError(f"{where}: it has no {path.name}") from e
    except OSError as e:  # a link swapped in since the lstat (ELOOP), or no permission
        raise RegistryError(f"{where}: cannot read {path.name}: {e.strerror}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RegistryError(f"{where}: {path.name} is not a regular file; refused")
    return fd, st.st_size


def _read(path: Path, limit: int, where: str) -> bytes:
    fd, size = open_regular(path, where)
    with os.fdopen(fd, "rb") as f:
        if size > limit:
            raise RegistryError(f"{where}: {path.name} has {size} bytes, more than the {limit} allowed")
        return f.read(limit + 1)


def read_manifest(bundle: Path, trust: Sequence[signing.PublicKey] = ()) -> Manifest:
    """A bundle's manifest, checked. With `trust`, it must carry a signature by one of those keys, checked
    over the very bytes that are then parsed."""
    where = f"bundle {bundle}"
    if not bundle.is_dir():
        raise RegistryError(f"{bundle} is not a bundle: it is not a folder")
    if not os.path.lexists(bundle / MANIFEST):
        raise RegistryError(f"{bundle} is not a bundle: it has no {MANIFEST}")
    raw = _read(bundle / MANIFEST, MAX_MANIFEST, where)
    signed = os.path.lexists(bundle / SIGNATURE)
    signed_by = None
    if trust:
        if not signed:
            raise RegistryError(f"{where} is not signed (it has no {SIGNATURE}) and --trust asks for a signature")
        sig = _read(bundle / SIGNATURE, signing.SIGNATURE_SIZE, where)
        signed_by = signing.fingerprint(signing.check_signature(raw, sig, trust, where))
    return parse_manifest(raw, where, signed, signed_by)


def parse_manifest(raw: bytes, where: str, signed: bool = False, signed_by: str | None = None) -> Manifest:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise RegistryError(f"{where}: {MANIFEST} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RegistryError(f"{where}: {MANIFEST} is not a graftlm bundle manifest")
    fv = doc.get("format_version")
    if isinstance(fv, bool) or fv != FORMAT_VERSION:
        raise RegistryError(f"{where}: {MANIFEST} has format version {fv!r:.20}; this graftlm reads {FORMAT_VERSION}")
    for key in ("created", "since", "adapters", "files"):
        if key not in doc:
            raise RegistryError(f"{where}: {MANIFEST} lacks {key}")
    created = doc["created"]
    if isinstance(created, bool) or not isinstance(created, int | float) or not math.isfinite(created):
        raise RegistryError(f"{where}: created must be a finite number (a Unix time)")
    if not isinstance(doc.get("graftlm_version", ""), str):
        raise RegistryError(f"{where}: graftlm_version must be a string")
    since = doc["since"]
    if not isinstance(since, list) or not all(isinstance(s, str) for s in since):
        raise RegistryError(f"{where}: since must be a list of references (strings)")
    for i, s in enumerate(since):
        try:
            Ref.parse(s)
        except RegistryError as e:
            raise RegistryError(f"{where}: since[{i}]: {e}") from None
    files = _files(doc["files"], where)
    adapters = _adapters(doc["adapters"], where)
    _agree(adapters, files, where)
    return Manifest(float(created), tuple(since), adapters, files, signed, signed_by)


def _files(raw: Any, where: str) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: files must be an object of sha256 -> size")
    files = {}
    for sha, n in raw.items():
        at = f"{where}: files[{sha!r:.80}]"
        files[check_sha256(sha, at)] = check_size(n, at)
    return files


def _adapters(raw: Any, where: str) -> tuple[Entry, ...]:
    if not isinstance(raw, list) or not raw:
        raise RegistryError(f"{where}: adapters must be a non-empty list")
    entries: list[Entry] = []
    seen: dict[tuple[str, str], int] = {}
    for i, d in enumerate(raw):
        at = f"{where}: adapters[{i}]"
        v = Version.from_dict(d, at)
        aliases = d.get("aliases", [])
        if not isinstance(aliases, list):
            raise RegistryError(f"{at}.aliases: must be a list of aliases")
        for j, a in enumerate(aliases):
            check_alias(a, f"{at}.aliases[{j}]")
            if seen.setdefault((v.name, a), v.version) != v.version:
                raise RegistryError(f"{at}.aliases[{j}]: {v.name}@{a} points at two versions in this bundle")
        if any(e.version.ref == v.ref for e in entries):
            raise RegistryError(f"{at}: {v.ref} is in this bundle twice")
        entries.append(Entry(v, tuple(aliases)))
    return tuple(entries)


def _agree(adapters: tuple[Entry, ...], files: dict[str, int], where: str) -> None:
    """Every file the bundle holds belongs to one of its versions, with the size that version records."""
    used: set[str] = set()
    for i, e in enumerate(adapters):
        for rel, f in e.version.files.items():
            used.add(f.sha256)
            if f.sha256 in files and files[f.sha256] != f.size:
                raise RegistryError(
                    f"{where}: adapters[{i}].files[{rel!r}].size is {f.size}, but files says {files[f.sha256]}"
                )
    extra = sorted(set(files) - used)
    if extra:
        raise RegistryError(f"{where}: files lists {extra[0][:12]}..., which no adapter in the bundle uses")
