"""One HTTP request to an ASGI app in this process, without a socket: what a Ray Serve replica uses to
pass a forwarded request to graftlm's own app (same endpoints, errors and streams as the plain server)
without a loopback server, its HTTP parsing and a thread of its own beside the engine."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

ASGIApp = Any  # (scope, receive, send) -> awaitable


@dataclass
class Head:
    """A response's status and headers, with its body when the app sent it in one piece (`done`)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    done: bool = False


def _scope(method: str, target: str, headers: list[tuple[str, str]]) -> dict[str, Any]:
    path, _, query = target.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }


async def call(
    app: ASGIApp, method: str, target: str, headers: list[tuple[str, str]], body: bytes
) -> AsyncIterator[Head | bytes]:
    """Run `app` on one request; yields a `Head`, then the rest of the body in chunks (none when the head
    has it all). Closing the iterator early tells the app the client went away."""
    messages: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
    gone = asyncio.Event()
    unread = [body]

    async def receive() -> dict[str, Any]:
        if unread:
            return {"type": "http.request", "body": unread.pop(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(_scope(method, target, headers), receive, send)
        except Exception as e:  # after Starlette's own 500 where it sent one; otherwise reported below
            await messages.put(e)
        finally:
            await messages.put(None)

    task = asyncio.get_running_loop().create_task(run())
    try:
        start = await messages.get()
        if not isinstance(start, dict) or start.get("type") != "http.response.start":
            raise RuntimeError(f"the app answered no response: {start!r}")
        head = Head(start["status"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start.get("headers", [])])
        first = await messages.get()
        if isinstance(first, dict) and first.get("type") == "http.response.body" and not first.get("more_body"):
            head.body, head.done = first.get("body", b""), True
            yield head
            return
        yield head
        message = first
        while isinstance(message, dict):
            if message.get("type") == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    return
            message = await messages.get()
    finally:
        gone.set()
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task
