"""`asgi_call.call` against the same app served over HTTP by `http_server` (what the plain server does)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from graftlm.server import asgi_call
from graftlm.server.run import free_port, http_server


def make_app(events: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"got": body, "query": request.url.query, "h": request.headers.get("x-k")}, 201)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def parts() -> AsyncIterator[str]:
            try:
                for i in range(3):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                events.append("stream closed")

        return StreamingResponse(parts(), media_type="text/event-stream")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    return app


async def collect(
    app: FastAPI, method: str, target: str, body: bytes = b"", headers: list[tuple[str, str]] | None = None
) -> tuple[asgi_call.Head, bytes]:
    parts = [p async for p in asgi_call.call(app, method, target, headers or [], body)]
    head = parts[0]
    assert isinstance(head, asgi_call.Head)
    return head, head.body + b"".join(p for p in parts[1:] if isinstance(p, bytes))


def test_in_process_answers_match_http() -> None:
    events: list[str] = []
    app = make_app(events)
    port = free_port()
    with http_server(app, "127.0.0.1", port):
        url = f"http://127.0.0.1:{port}"
        cases = [
            ("POST", "/echo?a=1", b'{"x": [1, 2]}', [("content-type", "application/json"), ("x-k", "v")]),
            ("GET", "/stream", b"", []),
            ("GET", "/missing", b"", []),
            ("POST", "/echo", b"{not json", [("content-type", "application/json")]),
            ("GET", "/boom", b"", []),
        ]
        for method, target, body, headers in cases:
            want = httpx.request(method, url + target, content=body, headers=dict(headers))
            head, got = asyncio.run(collect(app, method, target, body, headers))
            assert head.status == want.status_code, target
            assert got == want.content, target
            assert dict(head.headers)["content-type"] == want.headers["content-type"], target
    one, _ = asyncio.run(collect(app, "POST", "/echo", b"{}", [("content-type", "application/json")]))
    assert one.done  # a unary answer comes whole in the head
    streamed, _ = asyncio.run(collect(app, "GET", "/stream"))
    assert not streamed.done


def test_closing_early_tells_the_app_the_client_left() -> None:
    events: list[str] = []
    app = make_app(events)

    async def first_chunk_only() -> None:
        gen = asgi_call.call(app, "GET", "/stream", [], b"")
        head = await gen.__anext__()
        assert isinstance(head, asgi_call.Head) and head.status == 200
        assert await gen.__anext__() == b"data: 0\n\n"
        await gen.aclose()

    asyncio.run(first_chunk_only())
    assert events == ["stream closed"]
