"""Where the engine finds adapters by name: a folder on disk here, the registry in `graftlm.engine.registry_finder`.

A folder holds one adapter per subfolder, either `DIR/name/` or with versions `DIR/name/VERSION/`
(then `name` means the highest version and `name@VERSION` a given one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from graftlm.errors import GraftlmError
from graftlm.lora.peft_io import CONFIG_FILE

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # as the registry's names


class UnknownAdapterError(GraftlmError):
    """A request names an adapter that is not on disk or registered, or a version or alias it lacks.

    `known`: the adapter's name exists (only its version or alias does not), so the message may be shown
    to a client allowed to use that name; an unknown name gets the server's one uniform 404 instead.
    """

    def __init__(self, message: str, known: bool = False):
        super().__init__(message)
        self.known = known


@dataclass(frozen=True)
class Source:
    name: str
    version: str  # "" for an unversioned folder
    path: Path

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


class AdapterFinder(Protocol):
    def resolve(self, ref: str) -> Source | None:
        """The adapter folder `ref` names now; None if the name is unknown, UnknownAdapterError if the
        name is known but the version or alias is not."""
        ...

    def names(self) -> list[str]:
        """Every reference a request may use."""
        ...


def _is_adapter(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def _version_order(v: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[._-]", v))


class AdapterFolder:
    def __init__(self, root: Path):
        self.root = root

    def resolve(self, ref: str) -> Source | None:
        name, _, version = ref.partition("@")
        if version and not NAME.match(version):
            raise UnknownAdapterError(f"{ref[:80]!r} is not a valid adapter name")
        folder = self.root / name
        if not folder.is_dir():
            return None
        if _is_adapter(folder):
            if version:
                raise UnknownAdapterError(f"adapter {name} has no versions (asked for {version!r})", known=True)
            return Source(name, "", folder)
        versions = sorted((p.name for p in folder.iterdir() if _is_adapter(p)), key=_version_order)
        if not versions:
            raise UnknownAdapterError(f"adapter {name} has no version folder holding {CONFIG_FILE}", known=True)
        if version and version not in versions:
            raise UnknownAdapterError(
                f"adapter {name} has no version {version!r} (has {', '.join(versions)})", known=True
            )
        chosen = version or versions[-1]
        return Source(name, chosen, folder / chosen)

    def names(self) -> list[str]:
        found: set[str] = set()
        if not self.root.is_dir():
            return []
        for d in self.root.iterdir():
            if not d.is_dir() or not NAME.match(d.name):
                continue
            if _is_adapter(d):
                found.add(d.name)
            else:
                vs = [v.name for v in d.iterdir() if _is_adapter(v)]
                found.update([d.name] + [f"{d.name}@{v}" for v in vs] if vs else [])
        return sorted(found)
