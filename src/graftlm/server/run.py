"""Running the HTTP server beside the engine loop, and stopping both on Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import threading

import uvicorn
from fastapi import FastAPI

from graftlm.engine.scheduler import Engine


def serve(engine: Engine, app: FastAPI, host: str, port: int) -> None:
    """Serve HTTP from a background thread while the engine runs on this one (see `Engine.run_forever`);
    returns when the HTTP server stops, failing requests still running. Ctrl-C (SIGINT) or SIGTERM asks the
    HTTP server to stop and raises KeyboardInterrupt once everything is down; a second Ctrl-C interrupts at
    once. (A KeyboardInterrupt raised at an arbitrary point of the engine loop could land inside a lock or
    the adapter loader and leave shutdown waiting on it.)"""
    # log_config=None: keep our logging set-up (uvicorn would replace every handler)
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, log_level="warning", backlog=2048, timeout_keep_alive=30
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="graftlm-http", daemon=True)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stopping.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stopping.set()
        server.should_exit = True

    main = threading.current_thread() is threading.main_thread()  # handlers can only be set from there
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    thread.start()
    try:
        engine.run_forever(until=lambda: not thread.is_alive())
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping.is_set():
        raise KeyboardInterrupt
