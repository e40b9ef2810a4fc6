"""Versioned adapters: a SQLite index over a content-addressed folder of files (no torch needed)."""

from graftlm.registry.records import Ref, RegistryError, Version
from graftlm.registry.store import PROD, Registry

__all__ = ["PROD", "Ref", "Registry", "RegistryError", "Version"]
