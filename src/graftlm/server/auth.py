"""API keys and what each may do: the tenant it speaks for, the adapters it may use, whether it may
administer (load and unload adapters at run time).

Keys come from `--api-key` / `GRAFTLM_API_KEY` (full access) or a TOML file (`--keys`):

    [[keys]]
    key = "sk-alice-..."          # or sha256 = "<hex digest of the key>", so the file holds no secret
    tenant = "alice"
    adapters = ["reply-alice*", "summarize"]   # glob patterns over adapter names
    base = true                   # may use the base model with no adapter (default true)
    admin = false                 # may load and unload adapters (default false)

A request presents its key as `Authorization: Bearer KEY` (what OpenAI's clients send). Keys are held
as sha256 digests; a lookup hashes the presented key, so no comparison leaks a key's prefix.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graftlm.errors import GraftlmError

SHA256 = re.compile(r"^[0-9a-f]{64}$")
MIN_KEY_CHARS = 16


class KeysError(GraftlmError):
    """A keys file or key that cannot be used."""


@dataclass(frozen=True)
class Principal:
    """Who a request speaks for, and what it may touch."""

    tenant: str
    adapters: tuple[str, ...] = ("*",)  # glob patterns over adapter names (the part before '@')
    base: bool = True
    admin: bool = False

    def may_use(self, ref: str) -> bool:
        """May this principal use the adapter `ref` (`name`, `name@version`, `name@alias`)?"""
        name = ref.partition("@")[0]
        return any(fnmatch.fnmatchcase(name, p) for p in self.adapters)


ANONYMOUS = Principal("")  # a server without keys: one tenant, every adapter, no administration


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """Every key the server accepts, by digest. Empty means no authentication (loopback only)."""

    def __init__(self, keys: dict[str, Principal] | None = None):
        self._by_digest = dict(keys or {})

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    @property
    def has_admin(self) -> bool:
        return any(p.admin for p in self._by_digest.values())

    def lookup(self, key: str) -> Principal | None:
        return self._by_digest.get(digest(key))

    @classmethod
    def build(cls, plain: Iterable[str] = (), file: Path | None = None) -> KeyRing:
        """Keys given on the command line (full access, tenant "default") and those of a TOML file."""
        keys: dict[str, Principal] = {}
        for k in plain:
            _check_key(k, "--api-key")
            keys[digest(k)] = Principal("default", admin=True)
        if file is not None:
            for d, p in _read_file(file).items():
                if d in keys:
                    raise KeysError(f"{file}: a key is given twice")
                keys[d] = p
        return cls(keys)


def _check_key(key: str, where: str) -> None:
    if len(key) < MIN_KEY_CHARS or not key.isprintable() or key != key.strip():
        raise KeysError(f"{where}: a key is at least {MIN_KEY_CHARS} printable characters, with no spaces around")


def _read_file(path: Path) -> dict[str, Principal]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise KeysError(f"cannot read the keys file {path}: {e.strerror}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise KeysError(f"{path} is not valid TOML: {e}") from e
    entries = data.get("keys")
    if not isinstance(entries, list) or not entries or set(data) != {"keys"}:
        raise KeysError(f"{path}: write one [[keys]] table per key (and nothing else)")
    out: dict[str, Principal] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: keys[{i}]"
        d, p = _entry(entry, where)
        if d in out:
            raise KeysError(f"{where}: the same key is given twice")
        out[d] = p
    return out


def _entry(entry: Any, where: str) -> tuple[str, Principal]:
    if not isinstance(entry, dict):
        raise KeysError(f"{where}: a key is a table")
    unknown = set(entry) - {"key", "sha256", "tenant", "adapters", "base", "admin"}
    if unknown:
        raise KeysError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    if ("key" in entry) == ("sha256" in entry):
        raise KeysError(f"{where}: give exactly one of key or sha256")
    if "key" in entry:
        if not isinstance(entry["key"], str):
            raise KeysError(f"{where}: key is a string")
        _check_key(entry["key"], where)
        d = digest(entry["key"])
    else:
        d = entry["sha256"]
        if not isinstance(d, str) or not SHA256.match(d):
            raise KeysError(f"{where}: sha256 is 64 lowercase hex characters")
    tenant = entry.get("tenant")
    if not isinstance(tenant, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", tenant):
        raise KeysError(f"{where}: tenant is a name of letters, digits, '.', '_' or '-'")
    adapters = entry.get("adapters", [])
    if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
        raise KeysError(f'{where}: adapters is a list of glob patterns such as "reply-{tenant}*"')
    flags = {k: entry.get(k, k == "base") for k in ("base", "admin")}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise KeysError(f"{where}: base and admin are true or false")
    return d, Principal(tenant, tuple(adapters), flags["base"], flags["admin"])
