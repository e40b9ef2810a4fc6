"""A running HTTP server over an engine, for tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from graftlm.engine.scheduler import Engine
from graftlm.server.app import create_app
from graftlm.server.settings import ServerSettings


@contextmanager
def serving(engine: Engine, settings: ServerSettings | str) -> Iterator[str]:
    """Serve `engine` on a free port of 127.0.0.1 from a thread; yields the base URL; stops both after.
    `settings` may be just the base model's name (no keys, no runtime loading)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(engine, settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning", backlog=2048)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)
        engine.stop()
