"""What Ray Serve's HTTP proxy runs of graftlm's (it imports this module by the path in
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, so nothing heavy is imported here): a request whose replica
failed before answering, a replica that died mid-request most often, gets graftlm's 503 saying to retry,
in OpenAI's error shape, instead of the proxy's bare "Internal Server Error"."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

STOPPED = "the replica serving this request stopped before answering; retry the request"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def error_body(message: str, status: int) -> bytes:
    return json.dumps({"error": {"message": message, "type": "server_error", "code": status}}).encode()


async def respond(send: Send, status: int, content_type: str, body: bytes) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def run_watched(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> tuple[bool, Exception | None]:
    """Run `app` on a request: whether it started an answer, and the exception it raised before starting one
    (one raised after is raised again: the answer is already on its way)."""
    started = False

    async def watched(message: dict[str, Any]) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, watched)
    except Exception as e:
        if started:
            raise
        return False, e
    return started, None


class ClearFailures:
    """ASGI middleware: where the app ends (returns or raises) without having started a response, answer
    503 with `STOPPED`; everything else passes through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, error = await run_watched(self.app, scope, receive, send)
        if error is not None:
            log.warning("%s %s failed before answering: %s", scope.get("method"), scope.get("path"), error)
        if not started:
            await respond(send, 503, "application/json", error_body(STOPPED, 503))


def middlewares() -> list[Any]:
    """The proxy's middlewares (Ray Serve calls this once per proxy)."""
    from starlette.middleware import Middleware

    return [Middleware(ClearFailures)]
