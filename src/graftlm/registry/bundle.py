"""Bundles for devices: a folder holding `manifest.json` and the files it lists, each named by its sha256.

A delta bundle (`since=`) leaves out every file the named older versions already have, so a client
that holds those versions syncs only what changed. The importer checks every file against its hash,
and that the files a delta leaves out are already present, before it changes anything.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from graftlm import __version__
from graftlm.fileio import atomic_dir, file_sha256
from graftlm.registry import index
from graftlm.registry.records import RegistryError, Version
from graftlm.registry.store import Registry

FORMAT = "graftlm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def export(reg: Registry, refs: Iterable[str], out: Path, since: Iterable[str] = ()) -> dict[str, Any]:
    """Write a bundle of the versions `refs` name (with the aliases that point at them) to `out`."""
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
    with atomic_dir(out) as tmp:
        for sha in files:
            shutil.copyfile(reg.blobs.path(sha), tmp / sha)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / MANIFEST
    if not path.is_file():
        raise RegistryError(f"{bundle} is not a bundle: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegistryError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RegistryError(f"{path} is not a graftlm bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RegistryError(f"{path} has format version {manifest.get('format_version')}; this graftlm reads 1")
    return manifest


def import_bundle(reg: Registry, bundle: Path) -> list[Version]:
    """Add a bundle's versions (keeping their numbers) and aliases; returns the versions added. A file
    that does not match its hash, or a delta whose older files are missing here, refuses the whole bundle."""
    manifest = read_manifest(bundle)
    for sha, size in manifest["files"].items():
        f = bundle / sha
        if not f.is_file():
            raise RegistryError(f"bundle {bundle} lacks the file {sha}")
        if f.stat().st_size != size or file_sha256(f) != sha:
            raise RegistryError(f"bundle {bundle}: the file {sha[:12]}... does not match its sha256; refused")
    versions = [Version.from_dict(a) for a in manifest["adapters"]]
    for v in versions:
        for rel, f in v.files.items():
            if f.sha256 not in manifest["files"] and not reg.blobs.has(f.sha256):
                raise RegistryError(
                    f"{v.ref}: {rel} is not in this delta bundle nor here; import the versions it was made "
                    f"since ({', '.join(manifest['since']) or 'none named'}) first"
                )
    added = []
    with reg.writing():
        for sha in manifest["files"]:
            reg.blobs.put(bundle / sha)
        with reg.db() as db, index.transaction(db):
            for v, entry in zip(versions, manifest["adapters"], strict=True):
                mine = index.get_version(db, v.name, v.version)
                if mine is None:
                    index.insert_version(db, v)
                    added.append(v)
                elif mine.files != v.files:
                    raise RegistryError(f"{v.ref} exists here with different files; refused")
                for a in entry.get("aliases", []):
                    if index.alias(db, v.name, a) != v.version:
                        index.move_alias(db, v.name, a, v.version, f"imported from {bundle.name}")
    return added
