"""The registry as the serving engine's adapter finder: `name`, `name@VERSION` and `name@ALIAS`.

Every lookup reads the index, so when an alias moves the next request gets the new version (loaded
into a free slot off the request path) while requests already running finish on the old one.
"""

from __future__ import annotations

import logging

from graftlm.engine.adapter_finder import Source, UnknownAdapterError
from graftlm.registry.records import Ref
from graftlm.registry.store import Registry, RegistryError

log = logging.getLogger(__name__)


class RegistryFinder:
    def __init__(self, registry: Registry):
        self.registry = registry

    def resolve(self, ref: str) -> Source | None:
        try:
            r = Ref.parse(ref)
        except RegistryError as e:
            raise UnknownAdapterError(str(e)) from e
        if not self.registry.has(r.name):
            return None
        try:
            v = self.registry.resolve(r)
        except RegistryError as e:  # the name exists: its version or alias does not
            raise UnknownAdapterError(str(e), known=True) from e
        try:
            folder = self.registry.checkout(v)
        except RegistryError as e:  # a damaged or unsafe version: the operator's log says why, not the client
            log.error("cannot serve %s: %s", v.ref, e)
            raise UnknownAdapterError(f"{v.ref} cannot be served") from e
        return Source(v.name, str(v.version), folder)

    def names(self) -> list[str]:
        found = set(self.registry.names())
        found.update(f"{n}@{a}" for (n, a) in self.registry.aliases())
        return sorted(found)
