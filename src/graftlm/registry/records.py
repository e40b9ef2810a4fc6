"""What the registry stores about an adapter version, and how a reference names one."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graftlm.errors import GraftlmError
from graftlm.lora.files import CONFIG_FILE, FINGERPRINT_KEY, WEIGHTS_FILE

# \Z, not $: `$` also matches before a trailing newline, and "prod\n" is not an alias
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}\Z")  # never all digits: `name@3` is a version
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_VERSION = 2**31 - 1
MAX_PATH = 1024  # characters in a file path inside an adapter folder
MAX_PART = 255  # bytes in one part of it, as most file systems allow
TRAINING_RECORD = "training.json"
REQUIRED = (CONFIG_FILE, WEIGHTS_FILE)  # the files every adapter version holds
EVALUATION_FILE = "evaluation.json"  # a version's full evaluation (`graftlm eval --out`), beside its metrics


class RegistryError(GraftlmError):
    """A registry operation that cannot be done as asked (unknown name, bad alias, damaged store)."""


@dataclass(frozen=True)
class Ref:
    """`name`, `name@VERSION` or `name@ALIAS`; a bare name means its `prod` alias, else its latest version."""

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str) -> Ref:
        name, _, tail = text.partition("@")
        if not NAME.match(name):
            raise RegistryError(f"{text!r}: an adapter name is letters, digits, '.', '_' or '-'")
        if not tail:
            return cls(name)
        if tail.isascii() and tail.isdigit():  # not str.isdigit alone: it takes '²', which int() refuses
            return cls(name, version=check_version_number(int(tail), repr(text)))
        if not ALIAS.match(tail):
            raise RegistryError(f"{text!r}: after '@' comes a version number or an alias such as prod")
        return cls(name, alias=tail)

    def __str__(self) -> str:
        return self.name + (f"@{self.version}" if self.version else f"@{self.alias}" if self.alias else "")


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    created: float
    files: dict[str, FileEntry]  # path inside the adapter folder -> content
    lineage: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "files": {p: {"sha256": f.sha256, "size": f.size} for p, f in sorted(self.files.items())},
            "lineage": self.lineage,
            "metrics": self.metrics,
            "note": self.note,
        }

    def check(self, where: str = "") -> Version:
        """This version, if its name, number and every file path, hash and size are valid; else RegistryError.
        Rows read from the index are checked again before use: an old registry may hold unchecked ones."""
        where = where or self.ref
        check_name(self.name, f"{where}: name")
        check_version_number(self.version, f"{where}: version")
        check_files(self.files, f"{where}: files")
        return self

    @classmethod
    def from_dict(cls, d: Any, where: str = "version") -> Version:
        """A version from its `as_dict` form (a bundle's manifest), checking every field's type and value;
        a malformed one raises RegistryError naming the field. Other keys are left to the caller."""
        if not isinstance(d, dict):
            raise RegistryError(f"{where}: must be an object, not {_kind(d)}")
        missing = [k for k in ("name", "version", "created", "files", "lineage", "metrics", "note") if k not in d]
        if missing:
            raise RegistryError(f"{where}: lacks {', '.join(missing)}")
        name = check_name(d["name"], f"{where}.name")
        version = check_version_number(d["version"], f"{where}.version")
        created = d["created"]
        if isinstance(created, bool) or not isinstance(created, int | float) or not math.isfinite(created):
            raise RegistryError(f"{where}.created: must be a finite number (a Unix time), not {_show(created)}")
        for key in ("lineage", "metrics"):
            if not isinstance(d[key], dict):
                raise RegistryError(f"{where}.{key}: must be an object, not {_kind(d[key])}")
        if not isinstance(d["note"], str):
            raise RegistryError(f"{where}.note: must be a string, not {_kind(d['note'])}")
        raw = d["files"]
        if not isinstance(raw, dict) or not raw:
            raise RegistryError(f"{where}.files: must be a non-empty object of path -> {{sha256, size}}")
        files = {}
        for rel, f in raw.items():
            at = f"{where}.files[{_show(rel)}]"
            if not isinstance(f, dict) or set(f) != {"sha256", "size"}:
                raise RegistryError(f"{at}: must be an object with exactly sha256 and size")
            files[rel] = FileEntry(f["sha256"], f["size"])
        check_files(files, f"{where}.files")
        return cls(name, version, float(created), files, d["lineage"], d["metrics"], d["note"])


def _show(x: Any, limit: int = 80) -> str:
    """`repr` of a value for an error message, cut short: a hostile manifest may hold huge strings."""
    r = repr(x)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _kind(x: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(x), _show(x))


def check_name(name: Any, where: str = "name") -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise RegistryError(f"{where}: {_show(name)} is not a valid adapter name (letters, digits, '.', '_', '-')")
    return name


def check_version_number(n: Any, where: str = "version") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_VERSION:
        raise RegistryError(f"{where}: a version is a whole number from 1 to {MAX_VERSION}, not {_show(n)}")
    return n


def check_alias(alias: Any, where: str = "alias") -> str:
    if not isinstance(alias, str) or not ALIAS.match(alias):
        raise RegistryError(
            f"{where}: {_show(alias)} is not a valid alias (a letter, then letters, digits, '.', '_', '-')"
        )
    return alias


def check_sha256(sha: Any, where: str = "sha256") -> str:
    if not isinstance(sha, str) or not SHA256.fullmatch(sha):
        raise RegistryError(f"{where}: a sha256 is 64 lowercase hex characters, not {_show(sha)}")
    return sha


def check_size(size: Any, where: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 2**63:
        raise RegistryError(f"{where}: a size is a whole number of bytes >= 0, not {_show(size)}")
    return size


def check_relpath(rel: Any, where: str = "file path") -> str:
    """`rel` if it is a safe path inside an adapter folder: relative, POSIX, normalized, no hidden parts."""

    def bad(why: str) -> RegistryError:
        return RegistryError(f"{where}: {why}")

    if not isinstance(rel, str) or not rel:
        raise bad(f"a file path must be a non-empty string, not {_show(rel)}")
    if len(rel) > MAX_PATH:
        raise bad(f"a file path may have at most {MAX_PATH} characters, this one has {len(rel)}")
    if rel.startswith("/"):
        raise bad("a file path must be relative to the adapter folder, not start with '/'")
    if "\\" in rel:
        raise bad("a file path must use '/' only, not backslashes")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in rel):  # NUL, newlines, escapes, lone surrogates
        raise bad("a file path must not hold control characters")
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise bad(f"a file path must be normalized: no empty, '.' or '..' parts (found {part!r})")
        if part.startswith("."):
            raise bad(f"a file path must not have hidden parts ({part!r}): publish leaves them out")
        if len(part.encode()) > MAX_PART:
            raise bad(f"a part of a file path may have at most {MAX_PART} bytes")
    return rel


def check_files(files: dict[str, FileEntry], where: str = "files") -> None:
    """Every path, hash and size valid, and no file in the place of another's folder (`a` and `a/b`)."""
    for rel, f in files.items():
        check_relpath(rel, f"{where}[{_show(rel)}]")
        check_sha256(f.sha256, f"{where}[{_show(rel)}].sha256")
        check_size(f.size, f"{where}[{_show(rel)}].size")
    folders = {"/".join(rel.split("/")[:i]) for rel in files for i in range(1, rel.count("/") + 1)}
    clash = sorted(folders & set(files))
    if clash:
        raise RegistryError(f"{where}: {clash[0]!r} is both a file and a folder of other files")


def lineage_of(folder: Path) -> dict[str, Any]:
    """What an adapter folder says about where it came from: the base model it fits, and, when graftlm
    trained it, the data, settings, code version and parent adapter from its training record."""
    lineage: dict[str, Any] = {}
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        meta = _safetensors_metadata(weights)
        if FINGERPRINT_KEY in meta:
            lineage["base_fingerprint"] = meta[FINGERPRINT_KEY]
    record_path = folder / TRAINING_RECORD
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError as e:
            raise RegistryError(f"{record_path} is not valid JSON: {e}") from e
        base = record.get("base_model") or {}
        lineage["base_model"] = base.get("name")
        lineage["base_fingerprint"] = base.get("fingerprint", lineage.get("base_fingerprint"))
        lineage["data"] = {
            role: {"sha256": d["sha256"], "path": d.get("path")}
            for role, d in (record.get("data") or {}).items()
            if isinstance(d, dict) and "sha256" in d
        }
        lineage["config"] = record.get("config")
        lineage["code_version"] = record.get("graftlm_version")
        if record.get("init_from"):
            lineage["parent"] = record["init_from"]
    return lineage


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors header (8-byte little-endian length, then JSON)."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise RegistryError(f"{path} is not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n > 100 * 2**20:
            raise RegistryError(f"{path} is not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RegistryError(f"{path} is not a safetensors file: {e}") from e
    return header.get("__metadata__") or {}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def diff(a: Version, b: Version) -> dict[str, Any]:
    """What changed from version `a` to `b`: files, lineage and metrics, key by key."""
    files = {
        "added": sorted(set(b.files) - set(a.files)),
        "removed": sorted(set(a.files) - set(b.files)),
        "changed": sorted(p for p in set(a.files) & set(b.files) if a.files[p] != b.files[p]),
    }

    def changes(x: dict[str, Any], y: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        fx, fy = _flatten(x), _flatten(y)
        return {k: (fx.get(k), fy.get(k)) for k in sorted(set(fx) | set(fy)) if fx.get(k) != fy.get(k)}

    return {"files": files, "lineage": changes(a.lineage, b.lineage), "metrics": changes(a.metrics, b.metrics)}
