"""`graftlm serve --ray` on a real local Ray cluster (2 CPUs) with the tiny model and two engine replicas:
the OpenAI API answers as the plain server does (streaming and errors included), requests for one adapter
land on the replica that holds it (visible in each replica's metrics), and a killed replica is replaced
while later requests succeed. Skipped, with the reason, only where Ray Serve is missing or cannot start."""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from graftlm.cli.main import build_parser
from graftlm.cli.serve import replica_parts
from graftlm.lora.peft_io import save_adapter
from graftlm.server import ray_metrics
from graftlm.server.ray_serve import OWN_CLUSTER_SERVE, adapter_of, build_app
from graftlm.server.run import free_port
from tests.lora.helpers import EIGHT, random_adapter

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'graftlm[ray]'; make test installs it)")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'graftlm[ray]')")


def _app(tiny_dir: Path, adapters: Path, *extra: str, max_ongoing: int = 64) -> object:
    args = build_parser().parse_args(
        ["serve", "-m", str(tiny_dir), "--adapters", str(adapters), "--name", "tiny", "--max-batch", "4", *extra]
    )
    return build_app(functools.partial(replica_parts, args), 2, 8, 0.0, metrics_every_s=1.0, max_ongoing=max_ongoing)


@pytest.fixture(scope="module")
def adapters(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapters")
    for i, config in enumerate(EIGHT[:4]):
        a = random_adapter(tiny_dir, config, seed=i)
        save_adapter(out / f"a{i}", config, a.tensors, a.base_fingerprint)
    return out


@pytest.fixture(scope="module")
def url(tiny_dir: Path, adapters: Path) -> Iterator[str]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    port = free_port()
    try:
        with pytest.MonkeyPatch.context() as env:  # Ray Serve as `graftlm serve --ray` sets it up
            for name, value in OWN_CLUSTER_SERVE.items():
                env.setenv(name, value)
            ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    except Exception as e:
        pytest.skip(f"Ray Serve could not start here: {type(e).__name__}: {e}")
    serve.run(_app(tiny_dir, adapters, "--max-body-mb", "0.01"), name="graftlm", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _routed(metrics: str, what: str = "routed") -> dict[str, dict[str, int]]:
    """Completion requests served by each replica (or forwarded by it), per adapter, from the merged
    /metrics."""
    out: dict[str, dict[str, int]] = {}
    pattern = rf'graftlm_replica_{what}_total\{{replica="([^"]+)",adapter="([^"]+)"\}} (\d+)'
    for m in re.finditer(pattern, metrics):
        out.setdefault(m.group(1), {})[m.group(2)] = int(m.group(3))
    return out


def test_the_openai_api_answers_through_the_replicas(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    assert {m.id for m in client.models.list().data} >= {"tiny", "a0", "a1", "a2", "a3"}
    r = client.chat.completions.create(
        model="a1", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0
    )
    assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 6
    chunks = list(
        client.chat.completions.create(
            model="a1", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    bad = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 or bad.status_code == 422
    long = b'{"model": "a1", "prompt": "' + b"x" * 20_000 + b'"}'  # --max-body-mb 0.01: 10,485 bytes
    assert httpx.post(f"{url}/v1/completions", content=long).status_code == 413  # a declared length
    chunked = httpx.post(f"{url}/v1/completions", content=iter([long[:6000], long[6000:]]))  # none declared
    assert chunked.status_code == 413 and "body" in chunked.json()["error"]["message"]


def test_an_adapters_requests_stay_on_the_replica_that_holds_it(url: str) -> None:
    """Once Ray's router knows where an adapter is held (replicas report what they hold and Ray's controller
    passes it on every 0.5 s, so a request racing that may still go elsewhere), every request for it is
    served by that replica: where it lands, or forwarded there."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    names = ("a0", "a2", "a3")
    for name in names:  # each adapter gets a holder
        client.completions.create(model=name, prompt="the quick", max_tokens=2, temperature=0)
    time.sleep(2.5)  # Ray learns the holders; replicas report their metrics every second
    before = _routed(httpx.get(f"{url}/metrics").text)
    forwarded = _routed(httpx.get(f"{url}/metrics").text, "forwarded")
    for name in names:  # held nowhere yet, so the replica it landed on passed it to the one Ray picked
        assert sum(counts.get(name, 0) for counts in forwarded.values()) >= 1, forwarded
    for _ in range(3):
        for name in names:
            client.completions.create(model=name, prompt="the quick", max_tokens=2, temperature=0)
    time.sleep(2.5)
    after = _routed(httpx.get(f"{url}/metrics").text)
    for name in names:
        grew = {r: n - before.get(r, {}).get(name, 0) for r, counts in after.items() if (n := counts.get(name, 0))}
        holders = [r for r, d in grew.items() if d > 0]
        assert len(holders) == 1, (name, before, after)  # all three went to one replica
        assert grew[holders[0]] == 3


def test_a_killed_replica_ends_its_requests_with_an_error_and_is_replaced(url: str) -> None:
    """The replica holding a0 is killed while a0's requests decode there: each of them ends with its answer
    or a 503 saying to retry (from the proxy where the dead replica was the ingress, from the replica that
    forwarded it otherwise), none hangs; Ray Serve starts a new replica and later requests succeed."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    client.completions.create(model="a0", prompt="the quick", max_tokens=2, temperature=0)
    time.sleep(1.5)  # a metrics report
    holders = [r for r, counts in _routed(httpx.get(f"{url}/metrics").text).items() if counts.get("a0")]
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"]]
    assert len(replicas) == 2 and len(holders) >= 1
    holder = next(a for a in replicas if a["name"].endswith(holders[0]))

    def one(i: int) -> tuple[int, str]:
        body = {"model": "a0", "prompt": f"the quick {i}", "max_tokens": 100, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=90)
        return r.status_code, r.text

    with ThreadPoolExecutor(12) as pool:
        pending = [pool.submit(one, i) for i in range(12)]
        time.sleep(0.3)
        ray.kill(ray.get_actor(holder["name"], namespace=holder["namespace"]), no_restart=True)
        ended = [f.result(timeout=120) for f in pending]  # raises TimeoutError on a hang
    for status, text in ended:
        assert status == 200 or (status == 503 and "retry the request" in json.loads(text)["error"]["message"]), text
    assert any(status == 503 for status, _ in ended)  # 300 decode steps take seconds: the kill caught some

    deadline = time.monotonic() + 120
    answered = 0
    while answered < 4 and time.monotonic() < deadline:
        try:
            client.completions.create(model="a0", prompt="the quick", max_tokens=2, temperature=0, timeout=60)
            answered += 1
        except openai.APIStatusError as e:  # a request racing the replacement: a clear error, never a hang
            assert e.status_code == 503 and "retry" in str(e)
            time.sleep(0.5)
    assert answered == 4
    while time.monotonic() < deadline:
        alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"]]
        if len(alive) == 2 and holder["name"] not in {a["name"] for a in alive}:
            break
        time.sleep(1)
    else:
        pytest.fail("Ray Serve did not replace the killed replica")


def test_forwards_never_wedge_full_replicas_and_metrics_follow_the_keys(
    url: str, tiny_dir: Path, adapters: Path, tmp_path: Path
) -> None:
    """Redeployed with 2 requests per replica and API keys: 16 requests at once for adapters no replica holds
    yet all end (forwards take at most half of a replica's slots); /metrics wants a key, and shows a tenant
    only its own adapters' series, an admin all of them."""
    keys = tmp_path / "keys.toml"
    keys.write_text(
        '[[keys]]\nkey = "sk-admin-0123456789abcdef"\ntenant = "ops"\nadapters = ["*"]\nadmin = true\n'
        '[[keys]]\nkey = "sk-team-a-0123456789abcdef"\ntenant = "a"\nadapters = ["a1"]\n'
    )
    serve.delete("graftlm")
    serve.run(_app(tiny_dir, adapters, "--keys", str(keys), max_ongoing=2), name="graftlm", route_prefix="/")
    admin = {"authorization": "Bearer sk-admin-0123456789abcdef"}

    def one(i: int) -> int:
        body = {"model": f"a{i % 4}", "prompt": f"the quick {i}", "max_tokens": 8, "temperature": 0}
        return httpx.post(f"{url}/v1/completions", json=body, headers=admin, timeout=90).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(16), timeout=120))  # raises TimeoutError on a hang
    assert statuses == [200] * 16

    time.sleep(1.5)  # a metrics report
    assert httpx.get(f"{url}/metrics").status_code == 401
    everything = httpx.get(f"{url}/metrics", headers=admin).text
    assert {f'adapter="a{i}"' for i in range(4)} <= set(re.findall(r'adapter="a\d"', everything))
    assert "graftlm_engine_steps_total" in everything and "graftlm_replicas 2" in everything
    team = httpx.get(f"{url}/metrics", headers={"authorization": "Bearer sk-team-a-0123456789abcdef"}).text
    assert set(re.findall(r'adapter="a\d"', team)) == {'adapter="a1"'}
    assert "graftlm_engine_steps_total" in team


def test_adapter_keys_and_merged_metrics() -> None:
    body = json.dumps({"model": "summarize@3", "messages": []}).encode()
    assert adapter_of("POST", "/v1/chat/completions", body) == "summarize"  # versions share their replicas
    mix = json.dumps({"model": "a:0.7+b:0.3", "prompt": "x"}).encode()
    assert adapter_of("POST", "/v1/completions", mix) == "a:0.7+b:0.3"
    assert adapter_of("POST", "/v1/chat/completions", b"{broken") == ""
    assert adapter_of("GET", "/v1/models", b"") == ""
    merged = ray_metrics.merge({"r1": '# TYPE x counter\nx 2\ny{a="b"} 1.5\n', "r2": "# TYPE x counter\nx 3\n"})
    assert "x 5\n" in merged and 'y{a="b"} 1.5' in merged and 'x{replica="r2"} 3' in merged
    assert 'y{replica="r1",a="b"} 1.5' in merged and "graftlm_replicas 2" in merged
    text = '# TYPE z counter\nz{adapter="mine"} 1\nz{adapter="theirs"} 2\nz{adapter="(base)"} 3\nw 4\n'
    shown = ray_metrics.visible(text, lambda name: name in ("mine", "(base)"))
    assert shown == '# TYPE z counter\nz{adapter="mine"} 1\nz{adapter="(base)"} 3\nw 4\n'
