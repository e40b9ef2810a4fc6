"""graftlm on Ray Serve: engine replicas behind the same OpenAI-compatible API, routed by adapter.

One deployment, `EngineReplica`: N replicas, each one engine with its own byte-bounded adapter cache, each
the HTTP ingress itself (Ray Serve's proxy hands it the request), running graftlm's own app in-process, so
every endpoint, error and stream is exactly the plain server's. A completion request for an adapter this
replica holds, or for the base model, is served where it landed. One for an adapter it does not hold goes
on through Ray Serve's model multiplexing keyed by that adapter: to the replica that holds it, or to one
Ray picks to load it, so cold loads stay rare. An ingress in front of the replicas would cost every request
a second hop and Ray another process beside the engines (benchmarks/README.md, "Serving on Ray").

A replica that dies is replaced by Ray Serve. A request it held gets a 503 saying to retry (from the proxy
through `ray_proxy`'s middleware, or from the replica that forwarded it; mid-stream, a cut stream), never a
hang. `GET /metrics` merges the replicas' (totals, then each replica's series with a `replica` label): each
replica writes its own to Ray's key-value store every few seconds.

Needs `graftlm[ray]`; nothing else in graftlm imports Ray.
"""

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from graftlm.engine.engine import Engine
from graftlm.server import asgi_call
from graftlm.server.ray_proxy import STOPPED, Receive, Scope, Send, error_body, respond
from graftlm.server.settings import ServerSettings

log = logging.getLogger(__name__)
DEPLOYMENT = "EngineReplica"
COMPLETIONS = ("/v1/chat/completions", "/v1/completions")
HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}
STALE_S = 60.0  # a replica's metrics older than this (gone, replaced) leave /metrics
# Ray Serve logs every request in the proxy, the ingress and the replica at INFO: on a small host that
# costs more CPU than the routing; graftlm's own logs say what happened
QUIET = {"log_level": "WARNING", "enable_access_log": False}
METRICS_EVERY_S = 5.0
KV_NAMESPACE = "graftlm"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")

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
    """What Ray Serve's multiplexing keeps for an adapter this replica holds: its key, in `held` until Ray
    evicts it (Ray calls `__del__` when it drops the least recently used key)."""

    def __init__(self, ref: str, held: set[str]) -> None:
        self.ref, self.held = ref, held
        held.add(ref)

    def __del__(self) -> None:
        self.held.discard(self.ref)


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


def publish_metrics(app: str, replica: str, text: str) -> None:
    """Keep this replica's latest metrics in the cluster's key-value store (Ray's GCS, where Ray Serve keeps
    its own state): no actor of its own waking beside the engines."""
    from ray.experimental import internal_kv

    value = json.dumps({"at": time.time(), "text": text})
    internal_kv._internal_kv_put(f"metrics/{app}/{replica}", value, namespace=KV_NAMESPACE)


def fresh_metrics(app: str, within_s: float) -> dict[str, str]:
    """Every replica's latest metrics written within `within_s`; older ones (replicas gone) are deleted."""
    from ray.experimental import internal_kv

    out: dict[str, str] = {}
    now = time.time()
    for key in internal_kv._internal_kv_list(f"metrics/{app}/", namespace=KV_NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        try:
            entry = json.loads(raw) if raw is not None else {}
            fresh = now - float(entry["at"]) <= within_s
        except (ValueError, KeyError, TypeError):
            fresh = False
        if fresh:
            out[key.decode().rpartition("/")[2]] = entry["text"]
        else:
            internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
    return out


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

            self.runner = EngineThread(factory)
            self.graftlm = create_app(self.runner.engine, self.runner.settings)
            context = serve.get_replica_context()
            self.name, self.app_name = context.replica_id.unique_id, context.app_name
            self.held: set[str] = set()
            self.served: Counter[str] = Counter()  # completion requests served here, per adapter
            self.forwarded: Counter[str] = Counter()  # passed on to the adapter's holder
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
            """A request from Ray Serve's HTTP proxy."""
            if scope["type"] != "http":  # the app's lifespan
                return await self.graftlm(scope, receive, send)
            method, path = scope["method"], scope["path"]
            if method == "GET" and path == "/metrics":
                return await respond(send, 200, PROMETHEUS, (await self.cluster_metrics()).encode())
            if method != "POST" or path not in COMPLETIONS:
                return await self.graftlm(scope, receive, send)
            body = await read_body(receive)
            if body is None:
                return
            ref = adapter_of(method, path, body)
            if ref and ref not in self.held:
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
            """Pass a request on to the replica holding its adapter, and its answer back."""
            self.forwarded[ref] += 1
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
                await send({"type": "http.response.start", "status": head["status"], "headers": kept})
                await send({"type": "http.response.body", "body": head["body"], "more_body": not head["done"]})
                if head["done"]:
                    return
                try:
                    async for chunk in stream:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except RayError as e:  # the holder died mid-stream: end the stream, the client sees it cut
                    log.warning("replica failed while streaming %s: %s", target, e)
                await send({"type": "http.response.body", "body": b""})
            finally:
                stream.cancel()  # the client went away (or the answer is done): the holder stops decoding

        async def replica_metrics(self) -> str:
            """This replica's /metrics plus the completion requests it served and forwarded per adapter."""
            parts = [p async for p in asgi_call.call(self.graftlm, "GET", "/metrics", [], b"")]
            text = b"".join(p.body if isinstance(p, asgi_call.Head) else p for p in parts).decode()
            lines = [text.rstrip("\n")]
            for name, counts in (("routed", self.served), ("forwarded", self.forwarded)):
                lines += [f'graftlm_replica_{name}_total{{adapter="{a}"}} {n}' for a, n in sorted(counts.items())]
            return "\n".join(lines) + "\n"

        async def cluster_metrics(self) -> str:
            """Every live replica's metrics merged: this one's now, the others' as they last wrote them."""
            texts = await asyncio.to_thread(fresh_metrics, self.app_name, STALE_S)
            texts[self.name] = await self.replica_metrics()
            return merge_metrics(texts)

        async def _publish_every(self, seconds: float) -> None:
            while True:
                try:
                    text = await self.replica_metrics()
                    await asyncio.to_thread(publish_metrics, self.app_name, self.name, text)
                except Exception as e:  # metrics must never take the replica down
                    log.warning("could not publish metrics: %s", e)
                await asyncio.sleep(seconds)

        def check_health(self) -> None:
            if not self.runner.alive:
                raise RuntimeError("the engine loop stopped")

        def __del__(self) -> None:
            self.pusher.cancel()
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
