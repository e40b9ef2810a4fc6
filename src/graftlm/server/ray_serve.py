"""graftlm on Ray Serve: engine replicas behind the same OpenAI-compatible API, routed by adapter.

Two deployments. `EngineReplica` (N replicas) each hold one engine with its own byte-bounded adapter cache
and pass each request to graftlm's own app in-process (`asgi_call`), so every endpoint, error and stream is
exactly the plain server's. `Router` (the ingress, on Ray Serve's HTTP proxy) reads a request's `model` and
passes the request to a replica through Ray Serve's model multiplexing keyed by that adapter reference: a
replica that already holds the adapter gets its traffic, so cold loads stay rare; requests for the base
model go to any replica. A replica that dies is replaced by Ray Serve; a request it held gets a 503 with a
clear message, never a hang. `GET /metrics` merges the replicas' (totals, then each replica's series with a
`replica` label, including the requests routed to it per adapter).

Needs `graftlm[ray]`; nothing else in graftlm imports Ray. (No `from __future__ import annotations` here: Ray
Serve's FastAPI ingress reads the route methods' annotations as objects.)
"""

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from graftlm.engine.engine import Engine
from graftlm.server import asgi_call
from graftlm.server.settings import ServerSettings

log = logging.getLogger(__name__)
BOARD = "graftlm-metrics"  # the named actor holding each replica's latest metrics
COMPLETIONS = ("/v1/chat/completions", "/v1/completions")
HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}
STALE_S = 60.0
MAX_ONGOING = 100_000
# Ray Serve logs every request in the proxy, the ingress and the replica at INFO: on a small host that
# costs more CPU than the routing; graftlm's own logs say what happened
QUIET = {"log_level": "WARNING", "enable_access_log": False}
METRICS_EVERY_S = 5.0  # a replica silent this long (gone, replaced) leaves /metrics
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")

Factory = Callable[[], tuple[Engine, ServerSettings]]


def adapter_of(method: str, path: str, body: bytes) -> str:
    """The multiplexing key of a request: the `model` of a completion request ("" for anything else; the
    replica's app judges whether the model exists and whether the caller may use it)."""
    if method != "POST" or path not in COMPLETIONS:
        return ""
    try:
        model = json.loads(body).get("model", "")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(model, str) or len(model) > 512:
        return ""
    # keyed by the adapter's name: `summarize`, `summarize@prod` and `summarize@3` share replicas, and a
    # moved alias stays where its adapter was (one cold load of the new version there)
    return model if "+" in model or ":" in model else model.partition("@")[0]


def merge_metrics(texts: dict[str, str]) -> str:
    """Prometheus texts of several replicas as one: every series summed over replicas, then each replica's
    series again with a `replica` label."""
    meta: dict[str, str] = {}
    totals: dict[str, float] = {}
    per_replica: list[str] = []
    for replica, text in sorted(texts.items()):
        for line in text.splitlines():
            if line.startswith("#"):
                meta.setdefault(line, line)
                continue
            m = SAMPLE.match(line.strip())
            if m is None:
                continue
            name, labels, value = m.group(1), m.group(2) or "", m.group(3)
            try:
                totals[name + labels] = totals.get(name + labels, 0.0) + float(value)
            except ValueError:
                continue
            inner = labels[1:-1]
            tagged = f'replica="{replica}"' + ("," + inner if inner else "")
            per_replica.append(f"{name}{{{tagged}}} {value}")
    lines = list(meta) + [f"{k} {_number(v)}" for k, v in totals.items()] + per_replica
    lines.append(f"graftlm_replicas {len(texts)}")
    return "\n".join(lines) + "\n"


def _number(v: float) -> str:
    return str(int(v)) if v == int(v) and abs(v) < 2**53 else repr(v)


def error_body(message: str, status: int) -> bytes:
    return json.dumps({"error": {"message": message, "type": "server_error", "code": status}}).encode()


class EngineThread:
    """An engine built and run on one thread of its own. The model loads on the thread that runs it: libgomp
    keeps a pool of worker threads per thread that runs parallel torch ops, and a second pool makes every
    decode step slower on a small host (benchmarks/README.md, "Engine thread and malloc")."""

    def __init__(self, factory: Factory) -> None:
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(factory,), name="graftlm-engine", daemon=True)
        self.thread.start()
        self.ready.wait()
        if self.error is not None:
            raise self.error

    def _run(self, factory: Factory) -> None:
        try:
            self.engine, self.settings = factory()
        except BaseException as e:  # raised again on the constructing thread
            self.error = e
            return
        finally:
            self.ready.set()
        self.engine.run_forever()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        if self.error is None:
            self.engine.stop()
        self.thread.join(timeout=10)


def build_app(
    factory: Factory,
    replicas: int,
    adapters_per_replica: int,
    replica_cpus: float,
    metrics_every_s: float = METRICS_EVERY_S,
    max_ongoing: int = 64,
) -> Any:
    """The Ray Serve application: `serve.run(build_app(...))`."""
    from ray import serve

    board = _board()

    # Ray Serve lets a replica hold 5 requests by default, too few for a batching engine; `max_ongoing`
    # (twice the engine's rows) is where Ray starts sending a busy adapter's requests to another replica
    # rather than queueing them all on its holder (docs/scaling.md, the routing simulation)
    @serve.deployment(
        num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus}, max_ongoing_requests=max_ongoing
    )
    class EngineReplica:
        def __init__(self, factory: Factory) -> None:
            from graftlm.server.app import create_app

            self.runner = EngineThread(factory)
            self.app = create_app(self.runner.engine, self.runner.settings)
            self.name = serve.get_replica_context().replica_id.unique_id
            self.routed: Counter[str] = Counter()
            self.pusher: asyncio.Task[None] | None = None

        @serve.multiplexed(max_num_models_per_replica=adapters_per_replica)
        async def hold(self, ref: str) -> str:
            """Ray Serve's record that this replica holds `ref` (the engine's cache loads it on first use)."""
            return ref

        async def handle(
            self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
        ) -> AsyncIterator[Any]:
            if self.pusher is None:  # the replica's event loop runs now: report its metrics from here on
                self.pusher = asyncio.get_running_loop().create_task(self._push_every(metrics_every_s))
            ref = serve.get_multiplexed_model_id()
            if ref:
                await self.hold(ref)
            self.routed[ref or "(base)"] += 1
            # the app runs on this replica's event loop, no socket between: a unary answer is one item
            async for part in asgi_call.call(self.app, method, target, headers, body):
                if isinstance(part, asgi_call.Head):
                    kept = [(k, v) for k, v in part.headers if k.lower() not in HOP_BY_HOP]
                    yield {"status": part.status, "headers": kept, "body": part.body, "done": part.done}
                else:
                    yield part

        async def metrics(self) -> str:
            """This replica's /metrics plus the requests routed to it per adapter."""
            parts = [p async for p in asgi_call.call(self.app, "GET", "/metrics", [], b"")]
            text = b"".join(p.body if isinstance(p, asgi_call.Head) else p for p in parts).decode()
            routed = [f'graftlm_replica_routed_total{{adapter="{a}"}} {n}' for a, n in sorted(self.routed.items())]
            return text.rstrip("\n") + "\n" + "\n".join(routed) + "\n"

        async def _push_every(self, seconds: float) -> None:
            while True:
                try:
                    board.put.remote(self.name, await self.metrics())
                except Exception as e:  # metrics must never take the replica down
                    log.warning("could not report metrics: %s", e)
                await asyncio.sleep(seconds)

        def check_health(self) -> None:
            if not self.runner.alive:
                raise RuntimeError("the engine loop stopped")

        def __del__(self) -> None:
            self.runner.stop()

    app = FastAPI(title="graftlm on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING)
    @serve.ingress(app)
    class Router:
        def __init__(self, replicas: Any) -> None:
            self.replicas = replicas

        @app.get("/metrics")
        async def metrics(self) -> PlainTextResponse:
            texts = await board.fresh.remote(STALE_S)
            return PlainTextResponse(merge_metrics(texts), media_type="text/plain; version=0.0.4")

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
        async def forward(self, path: str, request: Request) -> Response:
            from ray.exceptions import RayError

            body = await request.body()
            path = "/" + path
            ref = adapter_of(request.method, path, body)
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")]
            stream = self.replicas.options(stream=True, multiplexed_model_id=ref).handle.remote(
                request.method, path + (f"?{request.url.query}" if request.url.query else ""), headers, body
            )
            try:
                head = await stream.__anext__()
            except (RayError, StopAsyncIteration) as e:
                log.warning("replica failed before answering %s %s: %s", request.method, path, e)
                message = "the replica serving this request stopped before answering; retry the request"
                return Response(error_body(message, 503), status_code=503, media_type="application/json")

            if head["done"]:
                return Response(head["body"], status_code=head["status"], headers=dict(head["headers"]))

            async def rest() -> AsyncIterator[bytes]:
                yield head["body"]
                try:
                    async for chunk in stream:
                        yield chunk
                except RayError as e:  # the replica died mid-stream: end the stream, the client sees it cut
                    log.warning("replica failed while streaming %s: %s", path, e)

            return StreamingResponse(rest(), status_code=head["status"], headers=dict(head["headers"]))

    return Router.bind(EngineReplica.bind(factory))


def _board() -> Any:
    """The named actor that keeps each replica's latest metrics (created once per cluster namespace)."""
    import ray

    @ray.remote(num_cpus=0)
    class MetricsBoard:
        def __init__(self) -> None:
            self.texts: dict[str, tuple[float, str]] = {}

        def put(self, replica: str, text: str) -> None:
            self.texts[replica] = (time.time(), text)

        def fresh(self, within_s: float) -> dict[str, str]:
            now = time.time()
            return {r: t for r, (at, t) in self.texts.items() if now - at <= within_s}

    return MetricsBoard.options(name=BOARD, get_if_exists=True).remote()


def serve_on_ray(
    factory: Factory,
    host: str,
    port: int,
    replicas: int,
    adapters_per_replica: int = 64,
    replica_cpus: float = 1.0,
    address: str | None = None,
    block: bool = True,
    max_ongoing: int = 64,
) -> None:
    """Start (or join) a Ray cluster and serve graftlm on it; with `block`, until interrupted."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        own: dict[str, Any] = {}
        if address is None:
            # a cluster of our own: Ray starts its workers at niceness 15, so a busy host (the clients, Ray's
            # own processes) takes the replicas' CPU first; serving replicas run at the normal priority.
            # No dashboard either: its processes take CPU from the replicas on a small host
            os.environ.setdefault("RAY_worker_niceness", "0")
            own["include_dashboard"] = False
        ray.init(address=address, logging_level=logging.WARNING, **own)
    serve.start(http_options={"host": host, "port": port}, logging_config=QUIET)
    app = build_app(factory, replicas, adapters_per_replica, replica_cpus, max_ongoing=max_ongoing)
    serve.run(app, name="graftlm", route_prefix="/", logging_config=QUIET)
    log.info("graftlm on Ray Serve: %d replicas at http://%s:%d/v1", replicas, host, port)
    if block:
        try:
            while True:
                asyncio.run(asyncio.sleep(3600))
        finally:
            serve.delete("graftlm")
