"""What an adapter version is made from, as hashes: base model, data files, settings and parent.

Two runs with equal inputs make the same adapter, so the pipeline retrains only when they differ,
and says which input changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from graftlm.fileio import file_sha256
from graftlm.pipeline.spec import AdapterSpec

log = logging.getLogger(__name__)
BASE_CACHE = "base-fingerprints.json"


def base_fingerprint(model_name: str, state: Path) -> str:
    """The base model's weights fingerprint, cached by the checkpoint files' size and mtime so that a run
    with nothing changed does not load the model."""
    from graftlm.loading import catalog

    source = catalog.resolve(model_name)
    files = sorted(p for p in source.checkpoint.rglob("*") if p.is_file())
    stamp = hashlib.sha256(
        json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()
    ).hexdigest()
    cache_path = state / BASE_CACHE
    cache: dict[str, str] = {}
    if cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except json.JSONDecodeError:
            cache = {}
    if stamp in cache:
        return cache[stamp]
    log.info("fingerprinting base model %s", model_name)
    model, _, _ = catalog.load(model_name)
    cache[stamp] = model.fingerprint()
    state.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=2))
    tmp.replace(cache_path)
    return cache[stamp]


def inputs(a: AdapterSpec, base: str, parent: dict[str, Any] | None) -> dict[str, Any]:
    """Everything that decides what an adapter run produces (training) and scores (evaluation)."""
    return {
        "base": base,
        "data": {role: file_sha256(path) for role, path in sorted(a.files.items())},
        "settings": {
            "train": a.train,
            "metric": a.metric,
            "max_new_tokens": a.max_new_tokens,
            "eval": a.eval,
        },
        "parent": parent,
    }


def key(ins: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ins, sort_keys=True).encode()).hexdigest()


def changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Why a run is needed, in words: 'no version yet', 'data changed (train)', 'base model changed'..."""
    if old is None:
        return ["no version yet"]
    out = []
    if old.get("base") != new["base"]:
        out.append("base model changed")
    data = sorted(
        r for r in set(old.get("data", {})) | set(new["data"]) if old.get("data", {}).get(r) != new["data"].get(r)
    )
    if data:
        out.append(f"data changed ({', '.join(data)})")
    settings = sorted(k for k in new["settings"] if old.get("settings", {}).get(k) != new["settings"][k])
    if settings:
        out.append(f"settings changed ({', '.join(settings)})")
    if old.get("parent") != new["parent"]:
        out.append("parent adapter changed")
    return out
