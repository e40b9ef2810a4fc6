"""The OpenAI-compatible HTTP API over the engine: thin, it turns HTTP into engine requests.

The request's `model` names the adapter: `name`, `name@version`, a weighted mix `a+b` or `a:0.7+b:0.3`,
or the base model's own name for no adapter. Who may call, and what each key may touch, is in
`ServerSettings` (see docs/security.md). Errors follow OpenAI's shape (`graftlm.server.errors`).
"""

from __future__ import annotations

from fastapi import FastAPI

from graftlm.engine.engine import Engine
from graftlm.server import admin, completions, errors, listing
from graftlm.server.limits import BodyLimit
from graftlm.server.settings import ServerSettings
from graftlm.server.state import Server


def create_app(engine: Engine, settings: ServerSettings | str) -> FastAPI:
    """The app serving `engine`; `settings` may be just the base model's name (no keys, no admin)."""
    if isinstance(settings, str):
        settings = ServerSettings(settings)
    app = FastAPI(title="graftlm", summary="one base model, many LoRA adapters, OpenAI's API")
    app.state.server = Server(engine, settings)
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.include_router(listing.router)
    app.include_router(completions.router)
    if settings.allow_runtime_loading:  # otherwise the routes do not exist: 404
        app.include_router(admin.router)
    return app
