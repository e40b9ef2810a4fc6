"""graftlm on Ray Serve: engine replicas behind the same OpenAI-compatible API, routed by adapter.

One deployment, `EngineReplica`: N replicas, each one engine with its own byte-bounded adapter cache, each
the HTTP ingress itself (Ray Serve's proxy hands it the request), running graftlm's own app in-process, so
every endpoint, error and stream is exactly the plain server's. A completion request for an adapter this
replica holds, or for the base model, is served where it landed. One for an adapter it does not hold goes
on through Ray Serve's model multiplexing keyed by that adapter: to the replica that holds it, or to one
Ray picks to load it, so cold loads stay rare. With one replica nothing is passed on, and at most half of a
replica's requests wait on forwards (so forwards never wait on each other for ever). An ingress in front of
the replicas would cost every request a second hop and Ray another process beside the engines
(benchmarks/README.md, "Serving on Ray").

A replica that dies is replaced by Ray Serve. A request it held gets a 503 saying to retry (from the proxy
through `ray_proxy`'s middleware, or from the replica that forwarded it; mid-stream, a cut stream), never a
hang. `GET /metrics` merges the replicas' (`ray_metrics`), showing each caller what graftlm's own
`/metrics` would.

Needs `graftlm[ray]`; nothing else in graftlm imports Ray Serve.
"""

import asyncio
import functools
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from graftlm.engine.engine import Engine
from graftlm.server import asgi_call, ray_metrics
from graftlm.server.auth import Principal
from graftlm.server.errors import ApiError
from graftlm.server.limits import BodyLimit
from graftlm.server.metrics import render_metrics
from graftlm.server.ray_proxy import STOPPED, Receive, Scope, Send, error_body, respond, run_watched
from graftlm.server.settings import ServerSettings
from graftlm.server.state import principal_of

log = logging.getLogger(__name__)
DEPLOYMENT = "EngineReplica"
COMPLETIONS = ("/v1/chat/completions", "/v1/completions")
HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}
# Ray Serve logs every request in the proxy, the ingress and the replica at INFO: on a small host that
# costs more CPU than the routing; graftlm's own logs say what happened
QUIET = {"log_level": "WARNING", "enable_access_log": False}
METRICS_EVERY_S = 5.0
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"

# Ray Serve settings for a cluster graftlm starts itself (Ray's processes inherit them). The proxy answers a
# request whose replica died with graftlm's 503 (`ray_proxy`). The rest are each one less thread hop or
# wake-up beside the engines: the replicas run graftlm's app on their own event loop rather than a second
# one, the HTTP proxy routes on its own loop, the controller reconciles every 0.5 s, not 0.1 s (a dead
# replica is noticed 0.4 s later), and Ray Serve's own metrics export every 1 s, not 0.1 s. Measured in
# benchmarks/README.md, "Serving on Ray"
OWN_CLUSTER_SERVE = {
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "graftlm.server.ray_proxy:middlewares",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}

Factory = Callable[[], tuple[Engine, ServerSettings]]


def may_see(who: Principal, label: str) -> bool:
    """Whether `who` sees an adapter's series in /metrics (`(base)`: requests for the base model)."""
    return who.base if label == "(base)" else bool(label) and who.may_use(label)


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


class Held:
    """What Ray Serve's multiplexing keeps for an adapter this replica holds: itself, in `held` under its key
    until Ray evicts it. Ray calls `__del__` when it drops the least recently used key, and Python calls it
    again when the object goes: only the entry that is still this object is removed."""

    def __init__(self, ref: str, held: "dict[str, Held]") -> None:
        self.ref, self.held = ref, held
        held[ref] = self

    def __del__(self) -> None:
        if self.held.get(self.ref) is self:
            self.held.pop(self.ref, None)


async def read_body(receive: Receive) -> bytes | None:
    """A request's whole body from ASGI messages (None if the client went away first)."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def replayed(body: bytes, receive: Receive) -> Receive:
    """`receive` for an app, giving it `body` already read and then the client's own messages (a
    disconnect)."""
    unread = [body]

    async def again() -> dict[str, Any]:
        if unread:
            return {"type": "http.request", "body": unread.pop(), "more_body": False}
        return await receive()

    return again


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
    from ray.exceptions import RayError

    forwarders = max(1, max_ongoing // 2)
    stale_s = 3 * metrics_every_s  # a replica silent this long (gone, replaced) leaves /metrics

    # Ray Serve lets a replica hold 5 requests by default, too few for a batching engine; `max_ongoing`
    # (twice the engine's rows) is where Ray starts sending a busy adapter's requests to another replica
    # rather than queueing them all on its holder (docs/scaling.md, the routing simulation)
    @serve.deployment(
        name=DEPLOYMENT,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=max_ongoing,
    )
    @serve.ingress()
    class EngineReplica:
        async def __init__(self, factory: Factory) -> None:
            from graftlm.server.app import create_app

            self.runner = await asyncio.to_thread(EngineThread, factory)  # the model loads off the event loop
            self.settings = self.runner.settings
            self.graftlm = create_app(self.runner.engine, self.settings)
            # graftlm's own limit, before this replica reads a body to route it
            self.bounded = BodyLimit(self._completion, self.settings.max_body_bytes)
            context = serve.get_replica_context()
            self.name, self.app_name = context.replica_id.unique_id, context.app_name
            self.held: dict[str, Held] = {}
            self.served: Counter[str] = Counter()  # completion requests served here, per adapter
            self.forwarded: Counter[str] = Counter()  # passed on to the adapter's holder
            self.forwarding = 0
            self.peers: Any = None
            self.pusher = asyncio.get_running_loop().create_task(self._publish_every(metrics_every_s))

        def __serve_build_asgi_app__(self) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
            async def app(scope: Scope, receive: Receive, send: Send) -> None:  # (uvicorn takes a method for ASGI 2)
                await self.ingress(scope, receive, send)

            return app

        @serve.multiplexed(max_num_models_per_replica=adapters_per_replica)
        async def hold(self, ref: str) -> Held:
            """Ray Serve's record that this replica holds `ref` (the engine's cache loads it on first use)."""
            return Held(ref, self.held)

        async def ingress(self, scope: Scope, receive: Receive, send: Send) -> None:
            """A request from Ray Serve's HTTP proxy. An error of this code's own before an answer started gets
            a 500 here; the proxy's middleware keeps its 503 for a replica that stopped."""
            if scope["type"] != "http":  # the app's lifespan
                return await self.graftlm(scope, receive, send)
            _, error = await run_watched(self._route, scope, receive, send)
            if error is not None:
                log.error("%s %s failed on this replica", scope["method"], scope["path"], exc_info=error)
                body = error_body(f"the replica could not handle the request: {type(error).__name__}: {error}", 500)
                await respond(send, 500, "application/json", body)

        async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
            method, path = scope["method"], scope["path"]
            if method == "GET" and path == "/metrics":
                return await self._metrics(scope, receive, send)
            if method != "POST" or path not in COMPLETIONS:
                return await self.graftlm(scope, receive, send)
            await self.bounded(scope, receive, send)

        async def _completion(self, scope: Scope, receive: Receive, send: Send) -> None:
            """A completion request whose body `BodyLimit` has read (a longer one got its 413 there)."""
            body = await read_body(receive)
            if body is None:
                return
            ref = adapter_of(scope["method"], scope["path"], body)
            if ref and ref not in self.held and replicas > 1 and self.forwarding < forwarders:
                return await self._forward(scope, ref, body, send)
            await self._serving(ref)
            await self.graftlm(scope, replayed(body, receive), send)

        async def handle(
            self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
        ) -> AsyncIterator[Any]:
            """A request another replica forwarded here, routed by its adapter."""
            await self._serving(serve.get_multiplexed_model_id())
            # the app runs on this replica's event loop, no socket between: a unary answer is one item
            async for part in asgi_call.call(self.graftlm, method, target, headers, body):
                if isinstance(part, asgi_call.Head):
                    kept = [(k, v) for k, v in part.headers if k.lower() not in HOP_BY_HOP]
                    yield {"status": part.status, "headers": kept, "body": part.body, "done": part.done}
                else:
                    yield part

        async def _serving(self, ref: str) -> None:
            if ref:
                await self.hold(ref)
            self.served[ref or "(base)"] += 1

        async def _forward(self, scope: Scope, ref: str, body: bytes, send: Send) -> None:
            """Pass a request on to the replica holding its adapter, and its answer back. A forward holds this
            replica's slot until the holder answers, so at most half the slots forward: the others serve
            requests that wait on nothing, and forwards into this replica always find one free in time."""
            self.forwarded[ref] += 1
            self.forwarding += 1
            if self.peers is None:
                self.peers = serve.get_deployment_handle(DEPLOYMENT, self.app_name)
            headers = [
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in scope["headers"]
                if k.lower() not in (b"host", b"content-length")
            ]
            query = scope.get("query_string", b"").decode("latin-1")
            target = scope["path"] + (f"?{query}" if query else "")
            stream = self.peers.options(stream=True, multiplexed_model_id=ref).handle.remote(
                scope["method"], target, headers, body
            )
            try:
                try:
                    head = await stream.__anext__()
                except (RayError, StopAsyncIteration) as e:
                    log.warning("replica failed before answering %s: %s", target, e)
                    return await respond(send, 503, "application/json", error_body(STOPPED, 503))
                kept = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head["headers"]]
                if head["done"]:
                    kept.append((b"content-length", str(len(head["body"])).encode()))
                await send({"type": "http.response.start", "status": head["status"], "headers": kept})
                await send({"type": "http.response.body", "body": head["body"], "more_body": not head["done"]})
                if head["done"]:
                    return
                try:
                    async for chunk in stream:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except RayError as e:  # the holder died mid-stream: the proxy cuts the connection
                    log.warning("replica failed while streaming %s: %s", target, e)
                    raise
                await send({"type": "http.response.body", "body": b""})
            finally:
                self.forwarding -= 1
                stream.cancel()  # the client went away (or the answer is done): the holder stops decoding

        async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
            """Every live replica's metrics merged (this one's now, the others' as they last wrote them),
            showing the caller what graftlm's own /metrics would."""
            authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
            try:
                who = principal_of(self.settings.keys, authorization)
            except ApiError as e:
                return await e.response()(scope, receive, send)
            texts = await asyncio.to_thread(ray_metrics.fresh, self.app_name, stale_s)
            texts[self.name] = self.replica_metrics()
            if not who.admin:
                shown = functools.partial(may_see, who)
                texts = {replica: ray_metrics.visible(text, shown) for replica, text in texts.items()}
            await respond(send, 200, PROMETHEUS, ray_metrics.merge(texts).encode())

        def replica_metrics(self) -> str:
            """This replica's metrics, every adapter's, plus the completion requests it served and forwarded
            per adapter."""
            lines = [render_metrics(self.runner.engine).rstrip("\n")]
            for name, counts in (("routed", self.served), ("forwarded", self.forwarded)):
                lines += [f'graftlm_replica_{name}_total{{adapter="{a}"}} {n}' for a, n in sorted(counts.items())]
            return "\n".join(lines) + "\n"

        async def _publish_every(self, seconds: float) -> None:
            while True:
                try:
                    await asyncio.to_thread(ray_metrics.publish, self.app_name, self.name, self.replica_metrics())
                except Exception as e:  # metrics must never take the replica down
                    log.warning("could not publish metrics: %s", e)
                await asyncio.sleep(seconds)

        def check_health(self) -> None:
            if not self.runner.alive:
                raise RuntimeError("the engine loop stopped")

        def __del__(self) -> None:
            if hasattr(self, "pusher"):
                self.pusher.cancel()
                try:
                    ray_metrics.forget(self.app_name, self.name)
                except Exception as e:  # the cluster may be going too
                    log.debug("could not drop this replica's metrics: %s", e)
            if hasattr(self, "runner"):
                self.runner.stop()

    return EngineReplica.bind(factory)


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
            for name, value in OWN_CLUSTER_SERVE.items():
                os.environ.setdefault(name, value)
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
