"""`/v1/chat/completions` and `/v1/completions`: a request becomes `n` engine requests per prompt, whose
outputs come back whole or as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from graftlm.engine.adapter_finder import Source
from graftlm.engine.request import Output
from graftlm.engine.request import Request as EngineRequest
from graftlm.engine.sampling import SamplingParams
from graftlm.server.auth import Principal
from graftlm.server.errors import ApiError, as_api_error
from graftlm.server.schemas import ChatCompletionRequest, CompletionRequest, ResponseFormat, Sampling
from graftlm.server.state import Caller, Server, ServerDep

log = logging.getLogger(__name__)
router = APIRouter()

DEFAULT_CHAT_MAX_TOKENS = 512
DISCONNECT_POLL_S = 0.5


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, server: ServerDep, who: Caller) -> Any:
    tok = server.engine.tokenizer
    if not tok.chat_template:
        raise ApiError(400, f"{server.model_name} has no chat template; use /v1/completions", param="messages")
    _check_choices(server, 1, body.n)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
    prompt = await asyncio.to_thread(tok.encode_chat, messages)  # off the event loop: other clients go on
    max_tokens = body.max_completion_tokens or body.max_tokens
    return await _respond(Call(server, who, body, request, chat=True), [prompt], max_tokens, body.response_format)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, server: ServerDep, who: Caller) -> Any:
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts or any(not t for t in texts):
        raise ApiError(400, "prompt must be a non-empty string or list of strings", param="prompt")
    _check_choices(server, len(texts), body.n)
    tok = server.engine.tokenizer
    prompts = await asyncio.to_thread(lambda: [tok.encode(t) for t in texts])
    return await _respond(Call(server, who, body, request, chat=False), prompts, body.max_tokens)


def _check_choices(server: Server, prompts: int, n: int) -> None:
    if prompts * n > server.settings.max_choices:
        raise ApiError(
            400,
            f"{prompts} prompt(s) x n={n} asks for {prompts * n} completions; this server answers at most "
            f"{server.settings.max_choices} per request",
            param="n" if prompts == 1 else "prompt",
        )


@dataclass
class Call:
    """One HTTP request being answered."""

    server: Server
    who: Principal
    body: Sampling
    request: Request
    chat: bool


@dataclass
class Job:
    """One choice of the response: an engine request and the queue its outputs arrive on."""

    index: int
    prompt: list[int]
    req: EngineRequest
    queue: asyncio.Queue[Output]


async def _respond(
    call: Call, prompts: list[list[int]], max_tokens: int | None, fmt: ResponseFormat | None = None
) -> Any:
    body = call.body
    jobs: list[Job] = []
    try:
        adapters = call.server.adapters_for(body, call.who)
        stop = body.stops()
        for p_i, prompt in enumerate(prompts):
            for k in range(body.n):
                params = _params(body, max_tokens, k, stop)
                jobs.append(Job(p_i * body.n + k, prompt, *_submit(call, prompt, params, adapters, fmt)))
    except Exception as e:
        _cancel(jobs)
        raise as_api_error(e, body.model) from e
    rid = ("chatcmpl-" if call.chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    t0 = time.monotonic()
    # `user` is recorded (OpenAI's field for abuse tracking), never trusted for access: the key decides
    log.info("%s: tenant=%r user=%r model=%r choices=%d", rid, call.who.tenant, body.user, body.model, len(jobs))
    if body.stream:
        return await _stream(call, jobs, rid, created)
    try:
        return await _complete(call, jobs, rid, created)
    finally:
        usage = _usage(jobs, body.n)
        log.info("%s: done in %.2f s, %d completion tokens", rid, time.monotonic() - t0, usage["completion_tokens"])


def _params(body: Sampling, max_tokens: int | None, index: int, stop: tuple[str, ...]) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_tokens or DEFAULT_CHAT_MAX_TOKENS,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        seed=None if body.seed is None else body.seed + index,  # taken modulo 2^64
        stop=stop,
    )


def _submit(
    call: Call,
    prompt: list[int],
    params: SamplingParams,
    adapters: list[tuple[Source, float]],
    fmt: ResponseFormat | None,
) -> tuple[EngineRequest, asyncio.Queue[Output]]:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[Output] = asyncio.Queue()

    def sink(out: Output) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody listens
            loop.call_soon_threadsafe(q.put_nowait, out)

    engine = call.server.engine
    json_mode = fmt is not None and fmt.type == "json_object"
    schema = fmt.json_schema.schema_ if fmt is not None and fmt.json_schema is not None else None
    req = engine.submit(prompt, params, adapters, sink, json_mode=json_mode, json_schema=schema, tenant=call.who.tenant)
    return req, q


async def _complete(call: Call, jobs: list[Job], rid: str, created: int) -> dict[str, Any]:
    body, choices = call.body, []
    try:
        for job in jobs:
            text, reason = "", None
            while reason is None:
                out = await _next(job, call.request)
                if out.error is not None:
                    raise as_api_error(out.error, body.model)
                text += out.delta
                reason = out.finish_reason
            if call.chat:
                message = {"role": "assistant", "content": text}
                choices.append({"index": job.index, "message": message, "finish_reason": reason, "logprobs": None})
            else:
                choices.append({"index": job.index, "text": text, "finish_reason": reason, "logprobs": None})
    finally:
        _cancel(jobs)
    return {
        "id": rid,
        "object": "chat.completion" if call.chat else "text_completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": _usage(jobs, body.n),
    }


async def _stream(call: Call, jobs: list[Job], rid: str, created: int) -> StreamingResponse:
    body, chat = call.body, call.chat
    merged: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()

    async def pump(job: Job) -> None:
        while True:
            out = await job.queue.get()
            await merged.put((job.index, out))
            if out.finish_reason is not None or out.error is not None:
                return

    tasks = [asyncio.create_task(pump(j)) for j in jobs]
    # the first event decides the status: an error before any token is a plain JSON error
    first = await merged.get()
    if first[1].error is not None:
        _cancel(jobs)
        for t in tasks:
            t.cancel()
        raise as_api_error(first[1].error, body.model)
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
                for j in jobs:
                    yield chunk(j.index, None, None, role=True)
            item: tuple[int, Output] | None = first
            while pending:
                index, out = item if item is not None else await merged.get()
                item = None
                if out.error is not None:
                    yield f"data: {json.dumps(as_api_error(out.error, body.model).body())}\n\n"
                    return
                if out.delta or out.finish_reason is not None:
                    yield chunk(index, out.delta, out.finish_reason)
                if out.finish_reason is not None:
                    pending -= 1
            if body.stream_options is not None and body.stream_options.include_usage:
                data = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": []}
                yield f"data: {json.dumps({**data, 'usage': _usage(jobs, body.n)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects mid-stream: free the rows
            _cancel(jobs)
            for t in tasks:
                t.cancel()

    return StreamingResponse(events(), media_type="text/event-stream")


def _cancel(jobs: list[Job]) -> None:
    """Free the rows of a response's requests (a no-op for the finished ones)."""
    for job in jobs:
        job.req.cancel()


def _usage(jobs: list[Job], n: int) -> dict[str, int]:
    """OpenAI's usage block: each distinct prompt counted once (jobs hold n choices per prompt)."""
    prompt_tokens = sum(len(j.prompt) for j in jobs[::n])
    completion = sum(len(j.req.token_ids) for j in jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def _next(job: Job, request: Request) -> Output:
    """The next output of a request, watching for the client going away meanwhile."""
    while True:
        try:
            return await asyncio.wait_for(job.queue.get(), timeout=DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                job.req.cancel()
                raise ApiError(499, "client closed the request") from None
