"""What a caller may see: `/health`, `/v1/models`, `/v1/adapters` and `/metrics`, each showing only the
adapters the caller's key may use."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from graftlm.server.metrics import render_metrics
from graftlm.server.state import Caller, ServerDep

router = APIRouter()


@router.get("/health")
async def health(server: ServerDep) -> dict[str, Any]:
    return {"status": "ok", "model": server.model_name, "uptime_s": round(time.time() - server.started, 1)}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(server: ServerDep, who: Caller) -> str:
    # a tenant sees its own adapters' counters; the base model's ("") sum every tenant's: admins only
    return render_metrics(server.engine, None if who.admin else lambda name: bool(name) and who.may_use(name))


@router.get("/v1/models")
async def models(server: ServerDep, who: Caller) -> dict[str, Any]:
    created, base = int(server.started), server.model_name
    data = []
    if who.base:
        data.append({"id": base, "object": "model", "created": created, "owned_by": "graftlm", "parent": None})
    data += [
        {"id": n, "object": "model", "created": created, "owned_by": "graftlm", "parent": base}
        for n in server.visible(who)
    ]
    return {"object": "list", "data": data}


@router.get("/v1/adapters")
async def adapters(server: ServerDep, who: Caller) -> dict[str, Any]:
    cache = server.engine.cache
    resident = {e.source.key: e for e in cache.resident()}
    rows = []
    for name in server.visible(who):
        e = resident.get(name)
        rows.append(
            {
                "name": name,
                "resident": e is not None,
                "pinned": bool(e and e.pinned),
                "running_requests": e.refs if e else 0,
                "load_ms": round(e.load_ms, 2) if e else None,
            }
        )
    return {"object": "list", "data": rows, "cache_bytes": cache.nbytes, "slots": server.engine.slots.n_slots}
