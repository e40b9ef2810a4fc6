"""What one careless or hostile client can send, and that everyone else is unharmed: huge bodies, bad
seeds, temperatures and weights, broken adapters, malformed bytes; every error in OpenAI's shape."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from graftlm.lora.config import LoraConfig
from graftlm.lora.peft_io import save_adapter
from graftlm.server.auth import KeyRing
from graftlm.server.settings import ServerSettings
from tests.engine.test_engine import make_engine
from tests.lora.helpers import random_adapter
from tests.server.helpers import serving

BASE = "tiny-base"
CONFIG = LoraConfig(r=4, alpha=8)
ADMIN = "sk-admin-admin-admin"


@pytest.fixture(scope="module")
def root(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("limits")
    for i in range(3):
        a = random_adapter(tiny_dir, CONFIG, seed=i)
        save_adapter(out / f"a{i}", CONFIG, a.tensors, a.base_fingerprint)
    nan = {k: t.clone() for k, t in a.tensors.items()}
    next(iter(nan.values()))[0, 0] = float("nan")
    save_adapter(out / "nan", CONFIG, nan, a.base_fingerprint)
    return out


@pytest.fixture(scope="module")
def server(tiny_dir: Path, root: Path) -> Iterator[str]:
    engine = make_engine(tiny_dir, root, max_batch=8, max_len=128, prefill_tokens=64)
    with serving(engine, ServerSettings(BASE, max_body_mb=1.0)) as url:
        yield url


def post(url: str, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def raw(url: str, data: bytes, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(url + path, content=data, headers={"content-type": "application/json"}, timeout=60)


def text_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def openai_shaped(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_every_error_has_openai_shape(server: str, root: Path) -> None:
    cases = [
        (raw(server, b'{"model": "a0", "messages": [{"role": "user", "content": "\xff\xfe"}]}'), 400),
        (raw(server, b"[" * 100_000 + b"]" * 100_000), 400),  # nested past the parser's recursion limit
        (raw(server, b'{"model": "a0", "messages": [{"role": "user", "content": "\\ud800"}]}'), 400),
        (raw(server, b'{"model": "a0", "prompt": "\\udfff x"}', "/v1/completions"), 400),
        (httpx.get(server + "/v1/nothing-here"), 404),
        (httpx.get(server + "/v1/completions"), 405),
        (post(server, {"model": "x" * 300, "prompt": "hi"}), 404),
        (raw(server, b'{"model": "a0", "prompt": "hi", "stop": ["\\ud800"]}', "/v1/completions"), 400),
    ]
    for r, status in cases:
        assert r.status_code == status, r.text
        error = openai_shaped(r)
        assert str(root) not in error["message"] and "Traceback" not in r.text
    assert "surrogate" in cases[2][0].json()["error"]["message"]
    assert post(server, {"model": "a0", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_20mb_body_is_refused_while_health_answers(server: str) -> None:
    big = b'{"model": "a0", "prompt": "' + b"x" * (20 * 2**20) + b'"}'
    results: dict[str, httpx.Response] = {}

    def chunks() -> Iterator[bytes]:  # no content-length: the server must count
        for i in range(0, len(big), 2**16):
            yield big[i : i + 2**16]

    def send(kind: str) -> None:
        try:
            data = big if kind == "sized" else chunks()
            results[kind] = httpx.post(
                server + "/v1/completions", content=data, headers={"content-type": "application/json"}, timeout=60
            )
        except httpx.HTTPError as e:  # the server may close before the client finished sending
            results[kind] = e  # type: ignore[assignment]

    threads = [threading.Thread(target=send, args=(k,)) for k in ("sized", "chunked")]
    for t in threads:
        t.start()
    slowest = 0.0
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        assert httpx.get(server + "/health", timeout=5).status_code == 200
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert slowest < 1.0
    assert isinstance(results["sized"], httpx.Response)  # refused on its content-length, before the body
    for kind, r in results.items():
        if isinstance(r, httpx.Response):
            assert r.status_code == 413, kind
            assert openai_shaped(r)["code"] == "too_large"


def test_bad_seeds_and_temperatures_leave_running_requests_unchanged(server: str) -> None:
    prompts = [f"Running request {i}" for i in range(4)]
    alone = [text_of(post(server, {"model": "a1", "prompt": p, "max_tokens": 40, "temperature": 0})) for p in prompts]

    async def go() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            running = [
                asyncio.create_task(
                    c.post("/v1/completions", json={"model": "a1", "prompt": p, "max_tokens": 40, "temperature": 0})
                )
                for p in prompts
            ]
            await asyncio.sleep(0.1)
            bad = [
                {"model": "a0", "prompt": "seed", "max_tokens": 8, "temperature": 0.8, "seed": 2**64},
                {"model": "a0", "prompt": "seed", "max_tokens": 8, "temperature": 0.8, "seed": 2**64 - 1, "n": 3},
                {"model": "a0", "prompt": "cold", "max_tokens": 8, "temperature": 1e-300},
                {"model": BASE, "prompt": "neg", "max_tokens": 8, "temperature": 0.5, "seed": -(2**63)},
            ]
            odd = [asyncio.create_task(c.post("/v1/completions", json=b)) for b in bad]
            return list(await asyncio.gather(*running)), list(await asyncio.gather(*odd))

    running, odd = asyncio.run(go())
    assert [text_of(r) for r in running] == alone
    assert odd[0].status_code == 400 and openai_shaped(odd[0])["param"] == "seed"
    assert [r.status_code for r in odd[1:]] == [200, 200, 200]
    greedy = text_of(post(server, {"model": "a0", "prompt": "cold", "max_tokens": 8, "temperature": 0}))
    assert text_of(odd[2]) == greedy  # a temperature under the floor is greedy


def test_nan_weights_and_a_nan_adapter_beside_a_base_request(server: str) -> None:
    base = {"model": BASE, "prompt": "The base answer", "max_tokens": 30, "temperature": 0}
    alone = text_of(post(server, base))
    nan_json = b'{"model": "tiny-base", "prompt": "x", "adapters": [{"name": "a0", "weight": NaN}]}'

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            sends = [
                c.post("/v1/completions", json=base),
                c.post("/v1/completions", json={**base, "model": "a0:nan"}),
                c.post("/v1/completions", json={**base, "model": "a0:1e30+a1"}),
                c.post("/v1/completions", json={**base, "model": BASE, "adapters": [{"name": "a1", "weight": 1e30}]}),
                c.post("/v1/completions", content=nan_json, headers={"content-type": "application/json"}),
                c.post("/v1/completions", json={**base, "model": "nan"}),
                c.post("/v1/completions", json=base),
            ]
            return list(await asyncio.gather(*sends))

    got = asyncio.run(go())
    assert text_of(got[0]) == text_of(got[-1]) == alone
    for r in got[1:5]:
        assert r.status_code == 400, r.text
        openai_shaped(r)
    assert got[5].status_code == 400 and "NaN or infinite" in openai_shaped(got[5])["message"]
    assert text_of(post(server, base)) == alone  # and after: the rows they touched are clean


def test_every_slot_pinned_fails_other_adapters_at_once(tiny_dir: Path, root: Path) -> None:
    from graftlm.loading.checkpoint import load_checkpoint
    from graftlm.lora.slots import AdapterSlots

    model, _ = load_checkpoint(tiny_dir)
    mb = 2 * AdapterSlots.slot_bytes(model, 16, torch.bfloat16) / 2**20 + 1e-3  # two slots
    engine = make_engine(tiny_dir, root, adapter_cache_mb=mb)
    settings = ServerSettings(BASE, KeyRing.build([ADMIN]), allow_runtime_loading=True, adapter_root=root)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with serving(engine, settings) as url:
        for name in ("a0", "a1"):
            r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "pin": True}, headers=auth)
            assert r.status_code == 200, r.text
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", json={"model": "a2", "prompt": "x"}, headers=auth, timeout=30)
        assert r.status_code == 400 and "pinned" in openai_shaped(r)["message"] and time.monotonic() - t0 < 5
        r = httpx.post(url + "/v1/completions", json={"model": "a0", "prompt": "x", "max_tokens": 2}, headers=auth)
        assert r.status_code == 200


def test_serve_refuses_an_open_address_without_keys(tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from graftlm.cli.main import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["serve", "-m", str(tiny_dir), "--host", "0.0.0.0", "--port", str(port)])
    assert code != 0 and "without API keys" in capsys.readouterr().err
