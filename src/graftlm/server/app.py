"""The OpenAI-compatible HTTP API over the engine: thin, it turns HTTP into engine requests.

The request's `model` names the adapter: `name`, `name@version`, a weighted mix `a+b` or `a:0.7+b:0.3`,
or the base model's own name for no adapter. Errors follow OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from graftlm.engine.adapter_finder import Source, UnknownAdapterError
from graftlm.engine.sampling import SamplingParams
from graftlm.engine.scheduler import Engine, EngineOverloadedError, Output
from graftlm.errors import GraftlmError, PromptTooLongError
from graftlm.lora.config import AdapterError
from graftlm.server.metrics import render_metrics
from graftlm.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    Sampling,
    UnloadAdapterRequest,
)

log = logging.getLogger(__name__)

DEFAULT_CHAT_MAX_TOKENS = 512
DISCONNECT_POLL_S = 0.5


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _as_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, UnknownAdapterError):
        return ApiError(404, str(e), "model_not_found", "model")
    if isinstance(e, PromptTooLongError):
        return ApiError(400, str(e), "context_length_exceeded", "messages")
    if isinstance(e, EngineOverloadedError):
        return ApiError(503, str(e), "overloaded")
    if isinstance(e, AdapterError):
        return ApiError(400, str(e), "adapter_error", "model")
    if isinstance(e, (GraftlmError, ValueError)):
        return ApiError(400, str(e))
    log.error("request failed", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}")


class Server:
    """What the routes share: the engine, the base model's name, and the request bookkeeping."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.started = time.time()

    def adapters_for(self, body: Sampling) -> list[tuple[Source, float]]:
        mix: list[tuple[str, float]] = []
        if body.model != self.model_name:
            for part in body.model.split("+"):
                name, _, weight = part.strip().partition(":")
                try:
                    mix.append((name, float(weight) if weight else 1.0))
                except ValueError:
                    raise ApiError(
                        400, f"bad adapter weight {weight!r} in model {body.model!r}", param="model"
                    ) from None
        mix += [(a.name, a.weight) for a in body.adapters or []]
        if len({n for n, _ in mix}) != len(mix):
            raise ApiError(400, f"an adapter is named twice in {body.model!r}", param="model")
        return [(self.engine.cache.resolve(name), w) for name, w in mix]

    def params(self, body: Sampling, max_tokens: int | None, index: int, stop: tuple[str, ...]) -> SamplingParams:
        seed = None if body.seed is None else body.seed + index
        return SamplingParams(
            max_new_tokens=max_tokens or DEFAULT_CHAT_MAX_TOKENS,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            seed=seed,
            stop=stop,
        )

    def submit(
        self, prompt: list[int], params: SamplingParams, adapters: list[tuple[Source, float]], json_mode: bool
    ) -> tuple[Any, asyncio.Queue[Output]]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Output] = asyncio.Queue()

        def sink(out: Output) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody listens
                loop.call_soon_threadsafe(q.put_nowait, out)

        req = self.engine.submit(prompt, params, adapters, sink, json_mode=json_mode)
        return req, q


def create_app(engine: Engine, model_name: str) -> FastAPI:
    server = Server(engine, model_name)
    app = FastAPI(title="graftlm", summary="one base model, many LoRA adapters, OpenAI's API")
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            if err.get("type") == "json_invalid":
                parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})")
            elif not where and err.get("type") in ("model_attributes_type", "dict_type"):
                parts.append("the body must be a JSON object")
            elif err.get("type") == "extra_forbidden":
                parts.append(f"unknown field {where!r}")
            else:
                parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        first = exc.errors()[0].get("loc", ()) if exc.errors() else ()
        param = ".".join(str(x) for x in first if x != "body") or None
        return ApiError(400, "; ".join(parts) or "bad request", param=param).response()

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(GraftlmError)
    async def _graftlm_error(_: Request, exc: GraftlmError) -> JSONResponse:
        return _as_api_error(exc).response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "uptime_s": round(time.time() - server.started, 1)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return render_metrics(engine)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(server.started)
        data = [{"id": model_name, "object": "model", "created": created, "owned_by": "graftlm", "parent": None}]
        data += [
            {"id": n, "object": "model", "created": created, "owned_by": "graftlm", "parent": model_name}
            for n in engine.cache.names()
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/adapters")
    async def adapters() -> dict[str, Any]:
        resident = {e.source.key: e for e in engine.cache.resident()}
        rows = []
        for name in engine.cache.names():
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
        return {"object": "list", "data": rows, "cache_bytes": engine.cache.nbytes, "slots": engine.slots.n_slots}

    async def _load(body: LoadAdapterRequest) -> dict[str, Any]:
        path = Path(body.lora_path) if body.lora_path else None
        try:
            entry = await asyncio.to_thread(engine.cache.load, body.lora_name, path, body.pin)
            await asyncio.to_thread(engine.cache.wait_ready, body.lora_name)
        except (GraftlmError, OSError) as e:
            raise ApiError(400 if not isinstance(e, UnknownAdapterError) else 404, str(e), param="lora_path") from e
        return {"status": "loaded", "name": entry.source.key, "load_ms": round(entry.load_ms, 2)}

    async def _unload(body: UnloadAdapterRequest) -> dict[str, Any]:
        if not engine.cache.unload(body.lora_name):
            raise ApiError(404, f"adapter {body.lora_name!r} is not loaded", "model_not_found", "lora_name")
        return {"status": "unloaded", "name": body.lora_name}

    app.post("/v1/load_lora_adapter")(_load)
    app.post("/v1/adapters/load")(_load)
    app.post("/v1/unload_lora_adapter")(_unload)
    app.post("/v1/adapters/unload")(_unload)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        tok = engine.tokenizer
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages
        ]
        if not tok.chat_template:
            raise ApiError(400, f"{model_name} has no chat template; use /v1/completions", param="messages")
        prompt = tok.encode_chat(messages)
        json_mode = body.response_format is not None and body.response_format.type == "json_object"
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _respond(body, request, [prompt], max_tokens, json_mode, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts or any(not t for t in texts):
            raise ApiError(400, "prompt must be a non-empty string or list of strings", param="prompt")
        prompts = [engine.tokenizer.encode(t) for t in texts]
        return await _respond(body, request, prompts, body.max_tokens, False, chat=False)

    async def _respond(
        body: Sampling, request: Request, prompts: list[list[int]], max_tokens: int | None, json_mode: bool, chat: bool
    ) -> Any:
        jobs: list = []
        try:
            adapters = server.adapters_for(body)
            stop = body.stops()
            for p_i, prompt in enumerate(prompts):
                for k in range(body.n):
                    params = server.params(body, max_tokens, k, stop)
                    jobs.append((p_i * body.n + k, prompt, server.submit(prompt, params, adapters, json_mode)))
        except Exception as e:
            _cancel(jobs)
            raise _as_api_error(e) from e
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            return await _stream(body, request, jobs, rid, created, chat)
        return await _complete(body, request, jobs, rid, created, chat)

    async def _complete(body: Sampling, request: Request, jobs: list, rid: str, created: int, chat: bool) -> Any:
        choices = []
        try:
            for index, _, (req, q) in jobs:
                text, reason = "", None
                while reason is None:
                    out = await _next(q, request, req)
                    if out.error is not None:
                        raise _as_api_error(out.error)
                    text += out.delta
                    reason = out.finish_reason
                if chat:
                    message = {"role": "assistant", "content": text}
                    choices.append({"index": index, "message": message, "finish_reason": reason, "logprobs": None})
                else:
                    choices.append({"index": index, "text": text, "finish_reason": reason, "logprobs": None})
        finally:
            _cancel(jobs)
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage(jobs, body.n),
        }

    async def _stream(body: Sampling, request: Request, jobs: list, rid: str, created: int, chat: bool) -> Any:
        merged: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()

        async def pump(index: int, q: asyncio.Queue[Output]) -> None:
            while True:
                out = await q.get()
                await merged.put((index, out))
                if out.finish_reason is not None or out.error is not None:
                    return

        tasks = [asyncio.create_task(pump(i, q)) for i, _, (_, q) in jobs]
        # the first event decides the status: an error before any token is a plain JSON error
        first = await merged.get()
        if first[1].error is not None:
            _cancel(jobs)
            for t in tasks:
                t.cancel()
            raise _as_api_error(first[1].error)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, delta: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if delta:
                    d["content"] = delta
                choice = {"index": index, "delta": d, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": index, "text": delta or "", "finish_reason": reason, "logprobs": None}
            data = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            pending = len(jobs)
            try:
                if chat:
                    for i, _, _ in jobs:
                        yield chunk(i, None, None, role=True)
                item: tuple[int, Output] | None = first
                while pending:
                    index, out = item if item is not None else await merged.get()
                    item = None
                    if out.error is not None:
                        err = _as_api_error(out.error)
                        yield f"data: {json.dumps({'error': {'message': err.message, 'type': 'server_error'}})}\n\n"
                        return
                    if out.delta or out.finish_reason is not None:
                        yield chunk(index, out.delta, out.finish_reason)
                    if out.finish_reason is not None:
                        pending -= 1
                if body.stream_options is not None and body.stream_options.include_usage:
                    usage = _usage(jobs, body.n)
                    data = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": []}
                    yield f"data: {json.dumps({**data, 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnects mid-stream: free the rows
                _cancel(jobs)
                for t in tasks:
                    t.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _cancel(jobs: list) -> None:
    """Free the rows of a response's requests (a no-op for the finished ones)."""
    for _, _, (req, _) in jobs:
        req.cancel()


def _usage(jobs: list, n: int) -> dict[str, int]:
    """OpenAI's usage block: each distinct prompt counted once (jobs hold n choices per prompt)."""
    prompt_tokens = sum(len(p) for _, p, _ in jobs[::n])
    completion = sum(len(req.token_ids) for _, _, (req, _) in jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def _next(q: asyncio.Queue[Output], request: Request, req: Any) -> Output:
    """The next output of a request, watching for the client going away meanwhile."""
    while True:
        try:
            return await asyncio.wait_for(q.get(), timeout=DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                req.cancel()
                raise ApiError(499, "client closed the request") from None


def serve(engine: Engine, app: FastAPI, host: str, port: int) -> None:
    """Serve HTTP from a background thread while the engine runs on this one (see `Engine.run_forever`);
    returns when the HTTP server stops, failing requests still running. Ctrl-C (SIGINT) or SIGTERM asks the
    HTTP server to stop and raises KeyboardInterrupt once everything is down; a second Ctrl-C interrupts at
    once. (A KeyboardInterrupt raised at an arbitrary point of the engine loop could land inside a lock or
    the adapter loader and leave shutdown waiting on it.)"""
    import signal
    import threading

    import uvicorn

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
