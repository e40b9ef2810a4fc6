"""The HTTP server on 127.0.0.1, driven by the official `openai` client (streaming and not) and by raw
HTTP for the bad-input cases."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from graftlm.engine.generate import Generator
from graftlm.engine.sampling import SamplingParams
from graftlm.loading.merged import load_merged
from graftlm.lora.peft_io import WEIGHTS_FILE, save_adapter
from tests.engine.test_engine import make_engine
from tests.lora.helpers import EIGHT, random_adapter
from tests.server.helpers import serving

BASE = "tiny-base"


@pytest.fixture(scope="module")
def adapters_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("served")
    for i in range(4):
        a = random_adapter(tiny_dir, EIGHT[i], seed=i)
        save_adapter(out / f"a{i}", EIGHT[i], a.tensors, a.base_fingerprint)
    a = random_adapter(tiny_dir, EIGHT[0], seed=9)
    save_adapter(out / "broken", EIGHT[0], a.tensors, a.base_fingerprint)
    data = (out / "broken" / WEIGHTS_FILE).read_bytes()
    (out / "broken" / WEIGHTS_FILE).write_bytes(data[:100] + b"\0" * 50)
    return out


@pytest.fixture(scope="module")
def server(tiny_dir: Path, adapters_dir: Path) -> Iterator[tuple[str, object]]:
    engine = make_engine(tiny_dir, adapters_dir, max_batch=8, max_len=128, prefill_tokens=64)
    with serving(engine, BASE) as url:
        yield url, engine


@pytest.fixture
def client(server: tuple[str, object]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def offline_chat(tiny_dir: Path, adapter: Path | None, text: str, n: int) -> str:
    model, tok, _ = load_merged(str(tiny_dir), adapter)
    prompt = tok.encode_chat([{"role": "user", "content": text}])
    return Generator(model, tok).generate([prompt], SamplingParams(max_new_tokens=n))[0].text


def test_chat_with_an_adapter_equals_offline(client: openai.OpenAI, tiny_dir: Path, adapters_dir: Path) -> None:
    for model, adapter in ((BASE, None), ("a1", adapters_dir / "a1")):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=12, temperature=0
        )
        assert r.choices[0].message.content == offline_chat(tiny_dir, adapter, "Hello there", 12)
        assert r.model == model and r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 3
        assert r.choices[0].finish_reason in ("stop", "length")


def test_streaming_gives_the_same_text_and_usage(client: openai.OpenAI) -> None:
    kw = {"model": "a2", "messages": [{"role": "user", "content": "Stream me"}], "max_tokens": 16, "temperature": 0}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_n_seed_stop_and_mix(client: openai.OpenAI) -> None:
    kw = {"model": "a0+a3:0.5", "prompt": "The quick brown", "max_tokens": 10, "temperature": 0.8, "seed": 3}
    a = client.completions.create(**kw, n=2)
    b = client.completions.create(**kw, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same texts
    assert sorted(c.index for c in a.choices) == [0, 1]
    stream = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert stream == a.choices[0].text
    full = client.completions.create(model=BASE, prompt="The quick brown", max_tokens=20, temperature=0)
    cut = full.choices[0].text[3:6]
    if cut.strip():
        stopped = client.completions.create(
            model=BASE, prompt="The quick brown", max_tokens=20, temperature=0, stop=cut
        )
        assert cut not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_models_lists_the_base_and_every_adapter(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[0] == BASE and {"a0", "a1", "a2", "a3", "broken"} <= set(ids)


def test_json_mode_output_is_json(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="a0",
        messages=[{"role": "user", "content": "Give JSON"}],
        max_tokens=100,
        temperature=0,
        response_format={"type": "json_object"},
    )
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_json_schema_mode_follows_the_schema(client: openai.OpenAI, server: tuple[str, object]) -> None:
    schema = {
        "type": "object",
        "properties": {"grade": {"enum": ["good", "poor"]}, "reason": {"type": "string", "maxLength": 20}},
        "required": ["grade", "reason"],
    }
    r = client.chat.completions.create(
        model="a0",
        messages=[{"role": "user", "content": "Grade this"}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "g", "schema": schema, "strict": True}},
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    bad = {"type": "json_schema", "json_schema": {"name": "g", "schema": {"type": "object", "properties": {"x": {}}}}}
    with pytest.raises(openai.BadRequestError, match="property 'x': type None is not supported"):
        client.chat.completions.create(model="a0", messages=[{"role": "user", "content": "x"}], response_format=bad)
    with pytest.raises(openai.BadRequestError, match="json_schema is given exactly when"):
        client.chat.completions.create(
            model="a0", messages=[{"role": "user", "content": "x"}], response_format={"type": "json_schema"}
        )


def test_bad_requests_get_openai_errors(client: openai.OpenAI, server: tuple[str, object]) -> None:
    url = server[0]
    bad = b'{"model": "a0", "messages": ['
    r = httpx.post(url + "/v1/chat/completions", content=bad, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"model": "a0", "prompt": "x", "bogus": 1}, timeout=10)
    assert r.status_code == 400 and "unknown field 'bogus'" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"model": "a0", "prompt": "x", "temperature": 9}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    with pytest.raises(openai.NotFoundError, match="nosuch"):
        client.chat.completions.create(model="nosuch", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=BASE, prompt="word " * 400)
    with pytest.raises(openai.BadRequestError, match="truncated or corrupt"):
        client.completions.create(model="broken", prompt="hi", max_tokens=3)
    ok = client.completions.create(model="a0", prompt="hi", max_tokens=3)  # others unharmed
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_disconnect_mid_stream_frees_the_row(server: tuple[str, object]) -> None:
    url, engine = server
    body = {"model": "a0", "prompt": "Go on", "max_tokens": 120, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        for _ in r.iter_lines():
            break  # read one event, then hang up
    deadline = time.monotonic() + 10
    while engine.batch_size and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.batch_size == 0 and not engine.prefilling


def test_500_concurrent_connections(server: tuple[str, object]) -> None:
    url = server[0]

    async def go() -> list[int]:
        limits = httpx.Limits(max_connections=600)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as c:

            async def one(i: int) -> int:
                body = {"model": f"a{i % 4}", "prompt": f"request {i}", "max_tokens": 2, "temperature": 0}
                return (await c.post("/v1/completions", json=body)).status_code

            return await asyncio.gather(*(one(i) for i in range(500)))

    codes = asyncio.run(go())
    assert codes == [200] * 500
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_metrics_count_per_adapter(server: tuple[str, object], client: openai.OpenAI) -> None:
    client.completions.create(model="a3", prompt="count me", max_tokens=2)
    text = httpx.get(server[0] + "/metrics").text
    assert 'graftlm_adapter_requests_total{adapter="a3"}' in text
    assert 'graftlm_adapter_load_failures_total{adapter="broken"}' in text
    for gauge in ("graftlm_queue_depth", "graftlm_batch_size", "graftlm_adapter_cache_bytes"):
        assert f"\n{gauge} " in text


def test_graftlm_serve_command(tiny_dir: Path, adapters_dir: Path) -> None:
    """The CLI end to end: `graftlm serve` in its own process, a request, then Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "graftlm.cli.main", "serve", "-m", str(tiny_dir), "--adapters", str(adapters_dir)]
    cmd += ["--port", str(port), "--max-batch", "4", "--max-len", "128", "--name", "tiny", "--pin", "a1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = client.completions.create(model="a1", prompt="Hello", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1 and r.model == "a1"
        adapters = httpx.get(f"http://127.0.0.1:{port}/v1/adapters").json()["data"]
        assert {a["name"]: a["pinned"] for a in adapters}["a1"] is True
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert "serving tiny with 5 adapters" in out
