"""Loading and unloading adapters at run time (vLLM's `/v1/load_lora_adapter` and unload).

Off unless the server runs with `--allow-runtime-loading`; then only for admin keys, only for adapter
names the key may use, and only from folders under the adapter root. A path never takes over a name
the adapters folder (or registry) serves, nor the base model's; a failed load leaves no trace; errors
never echo file contents or config values.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from graftlm.engine.adapter_finder import UnknownAdapterError
from graftlm.lora.config import AdapterError
from graftlm.server.auth import Principal
from graftlm.server.errors import ApiError, adapter_message, not_found
from graftlm.server.schemas import LoadAdapterRequest, UnloadAdapterRequest
from graftlm.server.state import Caller, ServerDep

router = APIRouter()


def _check_admin(who: Principal, name: str) -> None:
    if not who.admin:
        raise ApiError(403, "this API key may not load or unload adapters", "permission_denied")
    if not who.may_use(name):
        raise not_found(name)


def under_root(root: Path, lora_path: str) -> Path:
    """The folder `lora_path` names (relative to the root, or absolute), if it lies under the root."""
    raw = Path(lora_path)
    resolved = (raw if raw.is_absolute() else root / raw).resolve()  # links resolved: none leads out
    top = root.resolve()
    if resolved == top or not resolved.is_relative_to(top):
        raise ApiError(400, "lora_path must name an adapter folder under the server's adapter root", param="lora_path")
    if not resolved.is_dir():
        raise ApiError(400, "lora_path names no folder under the server's adapter root", param="lora_path")
    return resolved


@router.post("/v1/load_lora_adapter")
@router.post("/v1/adapters/load")
async def load(body: LoadAdapterRequest, server: ServerDep, who: Caller) -> dict[str, Any]:
    name = body.lora_name
    _check_admin(who, name)
    if name == server.model_name:
        raise ApiError(400, "an adapter cannot take the base model's name", param="lora_name")
    root = server.settings.adapter_root
    assert root is not None  # ServerSettings requires one for runtime loading
    path = under_root(root, body.lora_path) if body.lora_path else None
    try:
        entry = await asyncio.to_thread(server.engine.cache.load, name, path, body.pin)
    except UnknownAdapterError:
        raise not_found(name) from None
    except AdapterError as e:
        raise ApiError(400, adapter_message(e, name), "adapter_error", "lora_path") from None
    except OSError:
        raise ApiError(400, f"adapter {name!r} cannot be read", "adapter_error", "lora_path") from None
    return {"status": "loaded", "name": entry.source.key, "load_ms": round(entry.load_ms, 2)}


@router.post("/v1/unload_lora_adapter")
@router.post("/v1/adapters/unload")
async def unload(body: UnloadAdapterRequest, server: ServerDep, who: Caller) -> dict[str, Any]:
    _check_admin(who, body.lora_name)
    if not server.engine.cache.unload(body.lora_name):
        raise ApiError(404, f"adapter {body.lora_name[:80]!r} is not loaded", "model_not_found", "lora_name")
    return {"status": "unloaded", "name": body.lora_name}
