"""What the registry stores about an adapter version, and how a reference names one."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graftlm.errors import GraftlmError
from graftlm.lora.files import FINGERPRINT_KEY, WEIGHTS_FILE

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")  # never all digits: `name@3` is a version
TRAINING_RECORD = "training.json"


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
        if tail.isdigit():
            return cls(name, version=int(tail))
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Version:
        files = {p: FileEntry(f["sha256"], int(f["size"])) for p, f in d["files"].items()}
        return cls(d["name"], int(d["version"]), float(d["created"]), files, d["lineage"], d["metrics"], d["note"])


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
