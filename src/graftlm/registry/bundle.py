"""Bundles for devices: a folder holding `manifest.json` and the files it lists, each named by its sha256,
and optionally `manifest.sig`, an ed25519 signature of the manifest (see `signing`).

A delta bundle (`since=`) leaves out every file the named older versions already have, so a client
that holds those versions syncs only what changed. The importer checks the signature (when asked to),
every field of the manifest (see `manifest`), every file against its hash, and that the files a delta
leaves out are already present, before it changes anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from graftlm import __version__
from graftlm.fileio import atomic_dir
from graftlm.registry import index, signing
from graftlm.registry.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SIGNATURE,
    Manifest,
    open_regular,
    parse_manifest,
    read_manifest,
)
from graftlm.registry.records import RegistryError, Version
from graftlm.registry.store import Registry

__all__ = ["add_bundle", "check_bundle", "export", "import_bundle", "read_manifest"]

CHUNK = 1 << 22


def export(
    reg: Registry,
    refs: Iterable[str],
    out: Path,
    since: Iterable[str] = (),
    sign_with: signing.PrivateKey | None = None,
) -> dict[str, Any]:
    """Write a bundle of the versions `refs` name (with the aliases that point at them) to `out`, signed
    with `sign_with` if given."""
    chosen: dict[str, Version] = {}
    for r in refs:
        v = reg.resolve(r)
        chosen[v.ref] = v
    if not chosen:
        raise RegistryError("name at least one adapter version to export")
    old = [reg.resolve(r) for r in since]
    have = {f.sha256 for v in old for f in v.files.values()}
    held = reg.aliases()
    files: dict[str, int] = {}
    adapters = []
    for v in chosen.values():
        entry = v.as_dict()
        entry["aliases"] = sorted(a for (n, a), num in held.items() if n == v.name and num == v.version)
        adapters.append(entry)
        files.update({f.sha256: f.size for f in v.files.values() if f.sha256 not in have})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.time(),
        "graftlm_version": __version__,
        "since": [v.ref for v in old],
        "adapters": adapters,
        "files": dict(sorted(files.items())),
    }
    raw = json.dumps(manifest, indent=2).encode()
    parse_manifest(raw, f"export to {out}")  # what an importer would refuse (an old, unchecked row) is not sent
    with atomic_dir(out) as tmp:
        for sha in files:
            shutil.copyfile(reg.blobs.path(sha), tmp / sha)
        (tmp / MANIFEST).write_bytes(raw)
        if sign_with is not None:
            (tmp / SIGNATURE).write_bytes(signing.sign(sign_with, raw))
    return manifest


def check_bundle(bundle: Path, trust: Sequence[signing.PublicKey] = ()) -> Manifest:
    """Everything about a bundle that needs no registry: its signature (with `trust`, one of those keys
    must have signed it), its manifest, and every file it holds against its size and sha256."""
    m = read_manifest(bundle, trust)
    where = f"bundle {bundle}"
    for sha, size in m.files.items():
        fd, found = open_regular(bundle / sha, where)
        with os.fdopen(fd, "rb") as f:
            if found != size:
                raise RegistryError(f"{where}: the file {sha[:12]}... has {found} bytes, not {size}; refused")
            h = hashlib.sha256()
            while chunk := f.read(CHUNK):
                h.update(chunk)
        if h.hexdigest() != sha:
            raise RegistryError(f"{where}: the file {sha[:12]}... does not match its sha256; refused")
    return m


def import_bundle(reg: Registry, bundle: Path, trust: Sequence[signing.PublicKey] = ()) -> list[Version]:
    """Add a bundle's versions (keeping their numbers) and aliases; returns the versions added. With
    `trust`, a bundle not signed by one of those keys is refused. Anything wrong refuses the whole bundle
    before anything is written."""
    return add_bundle(reg, bundle, check_bundle(bundle, trust))


def add_bundle(reg: Registry, bundle: Path, m: Manifest) -> list[Version]:
    """The writing half of `import_bundle`, for a manifest `check_bundle` returned."""
    where = f"bundle {bundle}"
    with reg.db() as db:
        for e in m.adapters:
            v = e.version
            for rel, f in v.files.items():
                if f.sha256 in m.files:
                    continue
                if not reg.blobs.has(f.sha256):
                    raise RegistryError(
                        f"{v.ref}: {rel} is not in this delta bundle nor here; import the versions it was made "
                        f"since ({', '.join(m.since) or 'none named'}) first"
                    )
                if reg.blobs.path(f.sha256).stat().st_size != f.size:
                    raise RegistryError(f"{where}: {v.ref}: {rel} has another size here than the bundle says")
            _same_or_new(db, v)
    added = []
    with reg.writing():
        for sha in m.files:
            got, _ = reg.blobs.put(bundle / sha)
            if got != sha:  # changed since check_bundle hashed it; what was stored is unreferenced (gc)
                raise RegistryError(f"{where}: the file {sha[:12]}... changed while it was imported; refused")
        with reg.db() as db, index.transaction(db):
            for e in m.adapters:
                if _same_or_new(db, e.version):
                    index.insert_version(db, e.version)
                    added.append(e.version)
                for a in e.aliases:
                    if index.alias(db, e.version.name, a) != e.version.version:
                        index.move_alias(db, e.version.name, a, e.version.version, f"imported from {bundle.name}")
    return added


def _same_or_new(db: sqlite3.Connection, v: Version) -> bool:
    """True if `v` is new here; False if it is here with the same files; RegistryError if with others."""
    mine = index.get_version(db, v.name, v.version)
    if mine is not None and mine.files != v.files:
        raise RegistryError(f"{v.ref} exists here with different files; refused")
    return mine is None
