"""Running the HTTP server beside the engine: HTTP on a background thread, the engine loop on this one
(see `Engine.run_forever` for why the engine keeps the main thread). `graftlm serve`, the demo and the
tests all start the server through `http_server`."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from graftlm.engine.engine import Engine
from graftlm.errors import GraftlmError

START_TIMEOUT_S = 30


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def http_server(app: FastAPI, host: str, port: int) -> Iterator[uvicorn.Server]:
    """Serve `app` from a background thread; yields once it listens; stops it on leaving."""
    # log_config=None: keep our logging set-up (uvicorn would replace every handler)
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, log_level="warning", backlog=2048, timeout_keep_alive=30
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="graftlm-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        raise GraftlmError(f"the HTTP server could not start on {host}:{port} (is the port in use?)")
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def serve(engine: Engine, app: FastAPI, host: str, port: int) -> None:
    """Serve until the HTTP server stops, failing requests still running. Ctrl-C (SIGINT) or SIGTERM asks
    the HTTP server to stop and raises KeyboardInterrupt once everything is down; a second Ctrl-C
    interrupts at once. (A KeyboardInterrupt raised at an arbitrary point of the engine loop could land
    inside a lock or the adapter loader and leave shutdown waiting on it.)"""
    stopping = threading.Event()
    with http_server(app, host, port) as server:

        def on_signal(signum: int, _frame: object) -> None:
            if stopping.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            stopping.set()
            server.should_exit = True

        main = threading.current_thread() is threading.main_thread()  # handlers can only be set from there
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            engine.run_forever(until=lambda: server.should_exit)
        finally:
            server.should_exit = True
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    engine.stop()
    if stopping.is_set():
        raise KeyboardInterrupt
