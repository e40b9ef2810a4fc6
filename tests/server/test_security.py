"""Keys, tenants and administration, tried as an attacker would: a key sees and uses only its adapters,
"missing" and "not yours" look the same, and only an admin key loads adapters, only from the adapter
root, never over a name someone else serves."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from graftlm.lora.config import LoraConfig
from graftlm.lora.peft_io import CONFIG_FILE, WEIGHTS_FILE, save_adapter
from graftlm.server.app import create_app
from graftlm.server.auth import KeyRing, KeysError, digest
from graftlm.server.settings import ServerSettings, check_host
from tests.engine.test_engine import make_engine
from tests.lora.helpers import random_adapter
from tests.server.helpers import serving

BASE = "tiny-base"
ALICE, BOB, ALICE_ADMIN, OPS = ("sk-" + who * 8 for who in ("alice-", "bob---", "aladm-", "ops---"))
CONFIG = LoraConfig(r=4, alpha=8)
KEYS = f"""
[[keys]]
key = "{ALICE}"
tenant = "alice"
adapters = ["reply-alice*"]

[[keys]]
sha256 = "{digest(BOB)}"
tenant = "bob"
adapters = ["reply-bob*"]

[[keys]]
key = "{ALICE_ADMIN}"
tenant = "alice"
adapters = ["reply-alice*"]
admin = true

[[keys]]
key = "{OPS}"
tenant = "ops"
adapters = ["*"]
admin = true
"""


@pytest.fixture(scope="module")
def root(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tenants") / "adapters"
    for i, name in enumerate(("reply-alice", "reply-bob", "reply-alice-2")):
        a = random_adapter(tiny_dir, CONFIG, seed=i)
        save_adapter(out / name, CONFIG, a.tensors, a.base_fingerprint)
    return out


@pytest.fixture(scope="module")
def server(tiny_dir: Path, root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys_file.write_text(KEYS)
    settings = ServerSettings(
        BASE, KeyRing.build(file=keys_file), allow_runtime_loading=True, adapter_root=root, max_choices=32
    )
    engine = make_engine(tiny_dir, root, max_batch=8, max_len=128, prefill_tokens=64)
    with serving(engine, settings) as url:
        yield url


def call(url: str, key: str | None, path: str, body: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is None:
        return httpx.get(url + path, headers=headers, timeout=60)
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


def complete(url: str, key: str, model: str, prompt: str = "Hello", n: int = 8) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}
    return call(url, key, "/v1/completions", body)


def test_requests_need_a_valid_key(server: str) -> None:
    for key in (None, "sk-wrong-wrong-wrong", ALICE + "x"):
        r = complete(server, key, BASE)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert call(server, None, "/v1/models").status_code == 401
    assert call(server, None, "/metrics").status_code == 401
    assert call(server, None, "/health").json()["status"] == "ok"  # for load balancers
    assert complete(server, ALICE, BASE).status_code == 200


def test_two_keys_see_disjoint_adapters(server: str) -> None:
    def ids(key: str) -> set[str]:
        return {m["id"] for m in call(server, key, "/v1/models").json()["data"]} - {BASE}

    assert ids(ALICE) == {"reply-alice", "reply-alice-2"} and ids(BOB) == {"reply-bob"}
    assert {a["name"] for a in call(server, BOB, "/v1/adapters").json()["data"]} == {"reply-bob"}
    assert complete(server, ALICE, "reply-alice").status_code == 200
    assert complete(server, BOB, "reply-bob").status_code == 200
    alice_metrics = call(server, ALICE, "/metrics").text
    assert 'adapter="reply-alice"' in alice_metrics and "reply-bob" not in alice_metrics
    assert 'adapter="reply-bob"' in call(server, OPS, "/metrics").text


def test_missing_and_not_yours_get_identical_404s(server: str) -> None:
    def answer(key: str, model: str) -> tuple[int, dict]:
        r = complete(server, key, model)
        return r.status_code, r.json()

    # reply-bob exists but is not alice's; reply-alice-9 would be hers but does not exist
    for theirs, missing in (("reply-bob", "reply-alice-9"), ("reply-bob@1", "reply-alice-9@1")):
        s1, b1 = answer(ALICE, theirs)
        s2, b2 = answer(ALICE, missing)
        assert s1 == s2 == 404
        assert b1 == {"error": {**b2["error"], "message": b2["error"]["message"].replace(missing, theirs)}}
        assert "reply-alice" not in b1["error"]["message"].replace(theirs, "")  # no list of other adapters
    mixed = call(server, ALICE, "/v1/completions", {"model": "reply-alice+reply-bob", "prompt": "x"})
    assert mixed.status_code == 404
    weighted = {"model": BASE, "prompt": "x", "adapters": [{"name": "reply-bob", "weight": 0.5}]}
    assert call(server, ALICE, "/v1/completions", weighted).status_code == 404


def test_the_user_field_is_recorded_never_trusted(server: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="graftlm.server.completions")
    body = {"model": "reply-bob", "prompt": "x", "max_tokens": 2, "user": "bob"}
    assert call(server, ALICE, "/v1/completions", body).status_code == 404
    body["model"] = "reply-alice"
    assert call(server, ALICE, "/v1/completions", body).status_code == 200
    assert any("tenant='alice' user='bob'" in r.getMessage() for r in caplog.records)


def test_runtime_loading_is_off_unless_asked_for(tiny_dir: Path, root: Path) -> None:
    engine = make_engine(tiny_dir, root)
    try:
        client = TestClient(create_app(engine, BASE))
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/adapters/load"):
            r = client.post(path, json={"lora_name": "x", "lora_path": str(root / "reply-bob")})
            assert r.status_code == 404 and "error" in r.json()
    finally:
        engine.stop()
    with pytest.raises(Exception, match="admin key"):
        ServerSettings(BASE, KeyRing.build([]), allow_runtime_loading=True, adapter_root=root)
    with pytest.raises(Exception, match="without API keys"):
        check_host("0.0.0.0", KeyRing(), insecure=False)
    check_host("0.0.0.0", KeyRing(), insecure=True)
    check_host("::1", KeyRing(), insecure=False)


def test_a_hijack_is_refused_without_and_with_an_admin_key(server: str, root: Path, tmp_path: Path) -> None:
    before = complete(server, BOB, "reply-bob").json()["choices"][0]["text"]
    attempt = {"lora_name": "reply-bob", "lora_path": "reply-alice"}
    assert call(server, None, "/v1/load_lora_adapter", attempt).status_code == 401
    r = call(server, BOB, "/v1/load_lora_adapter", attempt)
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert call(server, ALICE_ADMIN, "/v1/load_lora_adapter", attempt).status_code == 404  # not hers
    assert call(server, ALICE_ADMIN, "/v1/unload_lora_adapter", {"lora_name": "reply-bob"}).status_code == 404
    r = call(server, OPS, "/v1/load_lora_adapter", attempt)  # an admin, but the name is served from disk
    assert r.status_code == 400 and "served from the adapters on disk" in r.json()["error"]["message"]
    r = call(server, OPS, "/v1/load_lora_adapter", {"lora_name": BASE, "lora_path": "reply-alice"})
    assert r.status_code == 400 and "base model" in r.json()["error"]["message"]
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link-out").symlink_to(outside)
    for path in (str(outside), "../outside", "link-out", "/etc", "reply-alice/../../x"):
        r = call(server, OPS, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path})
        assert r.status_code == 400 and "under the server's adapter root" in r.json()["error"]["message"], path
    (root / "link-out").unlink()
    assert complete(server, BOB, "reply-bob").json()["choices"][0]["text"] == before
    assert "evil" not in {m["id"] for m in call(server, OPS, "/v1/models").json()["data"]}


def test_an_admin_loads_swaps_and_unloads_under_its_own_names(server: str) -> None:
    kw = {"prompt": "Swap", "n": 6}
    want = [
        complete(server, ALICE, name, **kw).json()["choices"][0]["text"] for name in ("reply-alice", "reply-alice-2")
    ]
    r = call(server, ALICE_ADMIN, "/v1/load_lora_adapter", {"lora_name": "reply-alice-hot", "lora_path": "reply-alice"})
    assert r.status_code == 200, r.text
    assert complete(server, ALICE, "reply-alice-hot", **kw).json()["choices"][0]["text"] == want[0]
    r = call(
        server, ALICE_ADMIN, "/v1/load_lora_adapter", {"lora_name": "reply-alice-hot", "lora_path": "reply-alice-2"}
    )
    assert r.status_code == 200  # a hot swap of its own runtime adapter
    assert complete(server, ALICE, "reply-alice-hot", **kw).json()["choices"][0]["text"] == want[1]
    assert "reply-alice-hot" not in {m["id"] for m in call(server, BOB, "/v1/models").json()["data"]}
    assert complete(server, BOB, "reply-alice-hot").status_code == 404
    assert call(server, ALICE_ADMIN, "/v1/unload_lora_adapter", {"lora_name": "reply-alice-hot"}).status_code == 200
    assert complete(server, ALICE, "reply-alice-hot").status_code == 404


def test_a_failed_load_leaves_no_trace_and_echoes_nothing(server: str, root: Path) -> None:
    bad = root / "junk"
    bad.mkdir()
    (bad / CONFIG_FILE).write_text('{"peft_type": "SECRET-CONFIG-VALUE", "r": 4}')
    (bad / WEIGHTS_FILE).write_bytes(b"TOPSECRETBYTES" * 10)
    corrupt = root / "junk2"
    corrupt.mkdir()
    (corrupt / CONFIG_FILE).write_text(json.dumps(CONFIG.to_peft()))
    (corrupt / WEIGHTS_FILE).write_bytes(b"TOPSECRETBYTES" * 10)
    try:
        for folder, name in ((bad, "junk-a"), (corrupt, "junk-b")):
            r = call(server, OPS, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": folder.name})
            message = r.json()["error"]["message"]
            assert r.status_code == 400 and "cannot be used" in message
            for leak in ("SECRET", "TOPSECRET", str(root), str(int.from_bytes(b"TOPSECRE", "little"))):
                assert leak not in message
            assert name not in {m["id"] for m in call(server, OPS, "/v1/models").json()["data"]}
            assert name not in call(server, OPS, "/metrics").text
        # the same through a request that makes the cache load it
        r = complete(server, OPS, "junk2")
        assert r.status_code == 400 and "truncated or corrupt" in r.json()["error"]["message"]
        assert "TOPSECRET" not in r.text and str(root) not in r.text
    finally:
        for d in (bad, corrupt):
            for f in d.iterdir():
                f.unlink()
            d.rmdir()


def test_a_flooding_tenant_does_not_starve_another(server: str) -> None:
    """alice sends one 10,000-completion call (refused) and 60 requests at once; bob's one request is
    admitted within alice's fair share, so it ends long before her flood does."""
    huge = {"model": "reply-alice", "prompt": ["hi"] * 5000, "n": 2, "max_tokens": 2}
    t0 = time.monotonic()
    r = call(server, ALICE, "/v1/completions", huge)
    assert r.status_code == 400 and "at most 32" in r.json()["error"]["message"] and time.monotonic() - t0 < 5

    async def go() -> tuple[list[float], float]:
        async with httpx.AsyncClient(base_url=server, timeout=300) as c:

            async def one(key: str, model: str, i: int) -> float:
                body = {"model": model, "prompt": f"flood {i}", "max_tokens": 100, "temperature": 0}
                r = await c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200, r.text
                return time.monotonic()

            flood = [asyncio.create_task(one(ALICE, "reply-alice", i)) for i in range(60)]
            while queued(await c.get("/metrics", headers={"Authorization": f"Bearer {OPS}"})) < 40:
                await asyncio.sleep(0.02)  # until the flood waits in the engine, ahead of bob
            bob = await one(BOB, "reply-bob", 0)
            return await asyncio.gather(*flood), bob

    ends, bob_end = asyncio.run(go())
    later = sum(e > bob_end for e in ends)
    # first come, first served would put bob after all 60; with turns he runs in the first free row
    assert later >= 40, f"only {later} of alice's 60 requests ended after bob's"


def queued(metrics: httpx.Response) -> int:
    line = next(x for x in metrics.text.splitlines() if x.startswith("graftlm_queue_depth "))
    return int(line.split()[1])


def test_keys_files_are_checked(tmp_path: Path) -> None:
    f = tmp_path / "keys.toml"
    for text, message in (
        ("[[keys]]\nkey = 'short'\ntenant = 'a'\n", "at least 16"),
        ("[[keys]]\ntenant = 'a'\n", "exactly one of key or sha256"),
        (f"[[keys]]\nkey = '{ALICE}'\ntenant = 'a b'\n", "tenant is a name"),
        (f"[[keys]]\nkey = '{ALICE}'\ntenant = 'a'\nadmin = 'yes'\n", "true or false"),
        (f"[[keys]]\nkey = '{ALICE}'\ntenant = 'a'\nscope = 1\n", "unknown field"),
        ("not toml [", "not valid TOML"),
    ):
        f.write_text(text)
        with pytest.raises(KeysError, match=message):
            KeyRing.build(file=f)
