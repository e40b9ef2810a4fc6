"""The adapter registry: immutable versions with lineage and metrics, aliases, rollback, and garbage
collection, over a SQLite index and a content-addressed folder of files.

A registry is a folder:
    registry.db          the index (versions, files, aliases, alias history)
    blobs/ab/cdef...     every file once, named by its sha256, read-only
    tree/NAME/VERSION/   adapter folders built from hard links to the blobs, for loading
    lock                 held by writers that touch blobs (publish, delete, gc, import)

Publishing writes the blobs first, then records the version (and any alias) in one transaction; a
crash in between leaves only unreferenced blobs, which `gc` removes. A version is therefore visible
only once all its files are, and an alias can only point at a complete version.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graftlm.registry import index
from graftlm.registry.blobs import BlobStore
from graftlm.registry.records import (
    EVALUATION_FILE,
    REQUIRED,
    FileEntry,
    Ref,
    RegistryError,
    Version,
    check_alias,
    check_name,
    check_relpath,
    lineage_of,
)
from graftlm.registry.verify import problems

PROD = "prod"


@dataclass(frozen=True)
class GcReport:
    blobs: int
    bytes: int
    trees: int
    temporary: int


class Registry:
    def __init__(self, root: Path, create: bool = True):
        root = Path(root)
        if not (root / "registry.db").is_file():
            if not create:
                raise RegistryError(f"no registry at {root} (no registry.db)")
            root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.blobs = BlobStore(root / "blobs")
        self.trees = root / "tree"
        with self.db() as db:
            index.create(db)

    @contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        db = index.connect(self.root / "registry.db")
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Serialise the writers that add or remove blobs (the OS drops the lock if the process dies)."""
        with (self.root / "lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- adding ------------------------------------------------------------------------------
    def publish(
        self,
        folder: Path,
        name: str,
        lineage: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        note: str = "",
        aliases: Iterable[str] = (),
        evaluation: Path | None = None,
    ) -> Version:
        """Store an adapter folder as the next version of `name`, and point `aliases` at it in the same
        transaction. Lineage is read from the folder (base fingerprint, training record) and `lineage`
        adds to it; `evaluation`, a `graftlm eval --out` document, is stored with it as EVALUATION_FILE."""
        check_name(name, "publish")
        aliases = [check_alias(a, "publish") for a in aliases]
        paths = _adapter_files(Path(folder))
        if evaluation is not None:
            if not Path(evaluation).is_file():
                raise RegistryError(f"evaluation {evaluation} is not a file")
            paths[EVALUATION_FILE] = Path(evaluation)
        merged = lineage_of(Path(folder)) | (lineage or {})
        with self.writing():
            files = {rel: FileEntry(*self.blobs.put(p)) for rel, p in paths.items()}
            with self.db() as db, index.transaction(db):
                v = Version(name, index.next_version(db, name), time.time(), files, merged, metrics or {}, note)
                index.insert_version(db, v)
                for a in aliases:
                    index.move_alias(db, name, a, v.version, f"published {v.ref}")
        return v

    # ---- reading -----------------------------------------------------------------------------
    def resolve(self, ref: str | Ref) -> Version:
        """The version a reference names; unknown names, versions and aliases raise RegistryError."""
        r = Ref.parse(ref) if isinstance(ref, str) else ref
        with self.db() as db:
            if r.version is not None:
                number = r.version
            elif r.alias is not None:
                number = index.alias(db, r.name, r.alias)
                if number is None:
                    raise RegistryError(f"{r.name} has no alias {r.alias!r}" + self._aliases_hint(db, r.name))
            else:
                number = index.alias(db, r.name, PROD) or index.latest(db, r.name)
            v = index.get_version(db, r.name, number) if number is not None else None
            if v is None:
                if index.latest(db, r.name) is None:
                    raise RegistryError(f"no adapter named {r.name!r} in the registry" + self._names_hint(db))
                raise RegistryError(f"{r.name} has no version {number} (latest is {index.latest(db, r.name)})")
            return v

    def evaluation(self, v: Version) -> dict[str, Any] | None:
        """The evaluation document stored with a version (`graftlm eval --out`), or None if it has none."""
        entry = v.files.get(EVALUATION_FILE)
        if entry is None:
            return None
        try:
            doc = json.loads(self.blobs.path(entry.sha256).read_text())
        except (OSError, ValueError) as e:
            raise RegistryError(f"{v.ref}: its {EVALUATION_FILE} cannot be read: {e}") from None
        if not isinstance(doc, dict):
            raise RegistryError(f"{v.ref}: its {EVALUATION_FILE} is not a JSON object")
        return doc

    def versions(self, name: str | None = None) -> list[Version]:
        with self.db() as db:
            return index.versions(db, name)

    def has(self, name: str) -> bool:
        """Whether any version of `name` exists (one indexed lookup; serving asks on every request)."""
        with self.db() as db:
            return index.latest(db, name) is not None

    def names(self) -> list[str]:
        with self.db() as db:
            return [r[0] for r in db.execute("SELECT DISTINCT name FROM versions ORDER BY name")]

    def aliases(self, name: str | None = None) -> dict[tuple[str, str], int]:
        with self.db() as db:
            return index.aliases(db, name)

    def history(self, name: str, alias: str = PROD) -> list[dict[str, Any]]:
        with self.db() as db:
            return index.alias_history(db, name, alias)

    def checkout(self, v: Version) -> Path:
        """The adapter folder of a version, built once from its blobs (hard links, read-only).

        Every name, path and hash is checked again here, since the index may hold rows written before they
        were checked on the way in; the folder is built in a temporary folder beside it, nothing is
        written outside that, and a link found in the way is refused, never followed."""
        v.check()
        final = self.trees / v.name / str(v.version)
        if final.parent.is_symlink() or final.is_symlink():
            raise RegistryError(f"{v.ref}: {final} is a link; refused (run `graftlm registry verify`)")
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{v.version}.", dir=final.parent))
        try:
            self._build(v, tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # another process built it at the same moment: use theirs
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _build(self, v: Version, tmp: Path) -> None:
        root = tmp.resolve()
        for rel, f in sorted(v.files.items()):
            if not self.blobs.has(f.sha256):
                raise RegistryError(f"{v.ref}: the file {rel} ({f.sha256[:12]}) is missing from the store")
            dest = root / rel
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # `a` and `a/b` in one version (an old, unchecked row)
                raise RegistryError(f"{v.ref}: cannot place {rel!r}: {e.strerror}") from e
            if not dest.parent.resolve().is_relative_to(root) or os.path.lexists(dest):
                raise RegistryError(f"{v.ref}: {rel!r} would land outside its folder or on another file; refused")
            self.blobs.link(f.sha256, dest)

    # ---- aliases -----------------------------------------------------------------------------
    def promote(self, ref: str, alias: str = PROD, reason: str = "promote") -> tuple[Version, int | None]:
        """Point `alias` at the version `ref` names; returns it and the version the alias left."""
        check_alias(alias, "promote")
        v = self.resolve(ref)
        with self.db() as db, index.transaction(db):
            if index.get_version(db, v.name, v.version) is None:  # deleted since resolve
                raise RegistryError(f"{v.ref} was deleted")
            previous = index.move_alias(db, v.name, alias, v.version, reason)
        return v, previous

    def rollback(self, name: str, alias: str = PROD) -> tuple[int, int]:
        """Point `alias` back where it was before its last move; returns (from, to)."""
        with self.db() as db, index.transaction(db):
            current = index.alias(db, name, alias)
            if current is None:
                raise RegistryError(f"{name} has no alias {alias!r} to roll back")
            moves = [m for m in index.alias_history(db, name, alias) if m["version"] == current]
            target = moves[-1]["previous"] if moves else None
            if target is None or index.get_version(db, name, target) is None:
                raise RegistryError(f"{name}@{alias} has no earlier version to roll back to")
            index.move_alias(db, name, alias, target, f"rollback from {current}")
        return current, target

    # ---- removing ----------------------------------------------------------------------------
    def delete(self, ref: str, force: bool = False) -> Version:
        """Delete one version. One that an alias points at is refused unless `force` (which drops the alias)."""
        v = self.resolve(Ref.parse(ref))
        if Ref.parse(ref).version is None:
            raise RegistryError(f"name the version to delete exactly ({v.ref}), not {ref!r}")
        with self.writing(), self.db() as db, index.transaction(db):
            held = [a for (n, a), num in index.aliases(db, v.name).items() if num == v.version]
            if held and not force:
                raise RegistryError(f"{v.ref} is {', '.join(held)}; move the alias first or pass --force")
            for a in held:
                index.move_alias(db, v.name, a, None, f"deleted {v.ref}")
            index.delete_version(db, v.name, v.version)
        if not (self.trees / v.name).is_symlink():  # never delete through a link
            _remove(self.trees / v.name / str(v.version))
        return v

    def gc(self) -> GcReport:
        """Remove blobs no version references, built folders of deleted versions, and crash leftovers."""
        with self.writing():
            with self.db() as db:
                keep = index.referenced_blobs(db)
                live = {(v.name, str(v.version)) for v in index.versions(db)}
            blobs = freed = 0
            for sha in list(self.blobs.all()):
                if sha not in keep:
                    freed += self.blobs.path(sha).stat().st_size
                    self.blobs.delete(sha)
                    blobs += 1
            trees = 0
            if self.trees.is_dir():
                for d in self.trees.iterdir():
                    if not _is_real_dir(d):  # never walk into a link: it may point anywhere
                        _remove(d)
                        trees += 1
                        continue
                    for t in d.iterdir():
                        if t.name.startswith(".") or (d.name, t.name) not in live or not _is_real_dir(t):
                            _remove(t)
                            trees += 1
            return GcReport(blobs, freed, trees, self.blobs.sweep())

    # ---- checking ----------------------------------------------------------------------------
    def verify(self, rehash: bool = True) -> list[str]:
        """Every problem found in the index, the blobs and the built folders (see `registry.verify`)."""
        return problems(self, rehash)

    # ---- hints -------------------------------------------------------------------------------
    def _names_hint(self, db: sqlite3.Connection) -> str:
        names = [r[0] for r in db.execute("SELECT DISTINCT name FROM versions ORDER BY name LIMIT 21")]
        return f"; it holds {', '.join(names[:20])}" if names else " (the registry is empty)"

    def _aliases_hint(self, db: sqlite3.Connection, name: str) -> str:
        found = sorted(a for (_, a) in index.aliases(db, name))
        return f" (it has {', '.join(found)})" if found else " (it has no aliases)"


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    """Remove a file, link or folder; a link is removed itself, never what it points at."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _adapter_files(folder: Path) -> dict[str, Path]:
    """Every regular file under an adapter folder (hidden ones skipped), by path relative to it."""
    if not folder.is_dir():
        raise RegistryError(f"{folder} is not a folder")
    missing = [r for r in REQUIRED if not (folder / r).is_file()]
    if missing:
        raise RegistryError(f"{folder} is not an adapter folder: it lacks {', '.join(missing)}")
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        files[check_relpath(rel.as_posix(), f"{folder}: {rel.as_posix()!r}")] = p
    return files
