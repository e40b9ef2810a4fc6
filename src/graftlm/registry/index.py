"""The registry's SQLite index: versions, their files, aliases and the history of every alias move.

Each change is one transaction (`BEGIN IMMEDIATE`, WAL journal, `synchronous=FULL`), so a process
killed at any point leaves the index as it was before the change or after it, never in between.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from graftlm.registry.records import FileEntry, Version

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    created REAL NOT NULL,
    lineage TEXT NOT NULL,   -- JSON
    metrics TEXT NOT NULL,   -- JSON
    note TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS files (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (name, version, path),
    FOREIGN KEY (name, version) REFERENCES versions (name, version) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS files_by_sha ON files (sha256);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES versions (name, version)
);
CREATE TABLE IF NOT EXISTS alias_moves (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER,         -- NULL: the alias was removed
    previous INTEGER,        -- NULL: the alias was new
    at REAL NOT NULL,
    reason TEXT NOT NULL
);
"""


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def create(db: sqlite3.Connection) -> None:
    with transaction(db):
        for statement in (s.strip() for s in SCHEMA.split(";")):
            if statement:
                db.execute(statement)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, taken at once so that writers queue instead of failing mid-way."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def insert_version(db: sqlite3.Connection, v: Version) -> None:
    db.execute(
        "INSERT INTO versions (name, version, created, lineage, metrics, note) VALUES (?, ?, ?, ?, ?, ?)",
        (v.name, v.version, v.created, json.dumps(v.lineage, sort_keys=True), json.dumps(v.metrics), v.note),
    )
    db.executemany(
        "INSERT INTO files (name, version, path, sha256, size) VALUES (?, ?, ?, ?, ?)",
        [(v.name, v.version, p, f.sha256, f.size) for p, f in v.files.items()],
    )


def next_version(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT MAX(version) FROM versions WHERE name = ?", (name,)).fetchone()
    return (row[0] or 0) + 1


def get_version(db: sqlite3.Connection, name: str, version: int) -> Version | None:
    row = db.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)).fetchone()
    return None if row is None else _version(db, row)


def versions(db: sqlite3.Connection, name: str | None = None) -> list[Version]:
    if name is None:
        rows = db.execute("SELECT * FROM versions ORDER BY name, version").fetchall()
    else:
        rows = db.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()
    return [_version(db, r) for r in rows]


def _version(db: sqlite3.Connection, row: sqlite3.Row) -> Version:
    files = {
        r["path"]: FileEntry(r["sha256"], r["size"])
        for r in db.execute(
            "SELECT path, sha256, size FROM files WHERE name = ? AND version = ?", (row["name"], row["version"])
        )
    }
    return Version(
        row["name"],
        row["version"],
        row["created"],
        files,
        json.loads(row["lineage"]),
        json.loads(row["metrics"]),
        row["note"],
    )


def latest(db: sqlite3.Connection, name: str) -> int | None:
    return db.execute("SELECT MAX(version) FROM versions WHERE name = ?", (name,)).fetchone()[0]


def alias(db: sqlite3.Connection, name: str, alias_name: str) -> int | None:
    row = db.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias_name)).fetchone()
    return None if row is None else row[0]


def aliases(db: sqlite3.Connection, name: str | None = None) -> dict[tuple[str, str], int]:
    q = "SELECT name, alias, version FROM aliases" + (" WHERE name = ?" if name else "")
    return {(r[0], r[1]): r[2] for r in db.execute(q, (name,) if name else ())}


def move_alias(db: sqlite3.Connection, name: str, alias_name: str, version: int | None, reason: str) -> int | None:
    """Point an alias at a version (None removes it) and record the move; returns where it pointed before."""
    previous = alias(db, name, alias_name)
    now = time.time()
    if version is None:
        db.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias_name))
    else:
        db.execute(
            "INSERT INTO aliases (name, alias, version, updated) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version, updated = excluded.updated",
            (name, alias_name, version, now),
        )
    db.execute(
        "INSERT INTO alias_moves (name, alias, version, previous, at, reason) VALUES (?, ?, ?, ?, ?, ?)",
        (name, alias_name, version, previous, now, reason),
    )
    return previous


def alias_history(db: sqlite3.Connection, name: str, alias_name: str) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT version, previous, at, reason FROM alias_moves WHERE name = ? AND alias = ? ORDER BY id",
        (name, alias_name),
    )
    return [dict(r) for r in rows]


def delete_version(db: sqlite3.Connection, name: str, version: int) -> None:
    db.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, version))


def referenced_blobs(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT DISTINCT sha256 FROM files")}
