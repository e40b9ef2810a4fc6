"""A running HTTP server over an engine, for tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from graftlm.engine.engine import Engine
from graftlm.server.app import create_app
from graftlm.server.run import free_port, http_server
from graftlm.server.settings import ServerSettings


@contextmanager
def serving(engine: Engine, settings: ServerSettings | str) -> Iterator[str]:
    """Serve `engine` (already started) on a free port of 127.0.0.1; yields the base URL; stops both after.
    `settings` may be just the base model's name (no keys, no runtime loading)."""
    port = free_port()
    try:
        with http_server(create_app(engine, settings), "127.0.0.1", port):
            yield f"http://127.0.0.1:{port}"
    finally:
        engine.stop()
