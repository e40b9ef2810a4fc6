"""The adapter cache: loads on first use, one load for many waiters, LRU eviction of idle adapters only,
pinning, hot swap, and refusal of bad adapters without harm to the others."""

from __future__ import annotations

import gc
import shutil
import time
import weakref
from pathlib import Path

import pytest

from graftlm.engine.adapter_cache import AdapterCache, Entry, UnknownAdapterError
from graftlm.engine.sampling import SamplingParams
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.config import AdapterError, LoraConfig
from graftlm.lora.peft_io import WEIGHTS_FILE, read_adapter, save_adapter
from graftlm.lora.slots import AdapterSlots
from tests.engine.test_engine import make_engine, offline
from tests.lora.helpers import random_adapter

SMALL = LoraConfig(r=4, alpha=8)


def write(tiny_dir: Path, path: Path, seed: int, config: LoraConfig = SMALL) -> Path:
    a = random_adapter(tiny_dir, config, seed=seed)
    save_adapter(path, config, a.tensors, a.base_fingerprint)
    return path


@pytest.fixture
def cache(tiny_dir: Path, tmp_path: Path) -> AdapterCache:
    for i in range(5):
        write(tiny_dir, tmp_path / f"a{i}", seed=i)
    model, _ = load_checkpoint(tiny_dir)
    c = AdapterCache(AdapterSlots(model, n_slots=2, r_max=8), tmp_path)
    yield c
    c.close()


def acquire(cache: AdapterCache, name: str) -> list[Entry]:
    src = [cache.resolve(name)]
    entries = cache.try_acquire(src, first_try=True)
    deadline = time.monotonic() + 10
    while entries is None and time.monotonic() < deadline:
        time.sleep(0.002)
        entries = cache.try_acquire(src, first_try=False)
    assert entries is not None
    return entries


def test_many_waiters_cause_one_load(cache: AdapterCache) -> None:
    src = [cache.resolve("a0")]
    with cache.lock:  # the load cannot finish while we ask (on a busy machine it could between two tries)
        assert all(cache.try_acquire(src, first_try=True) is None for _ in range(10))
    held = acquire(cache, "a0")
    st = cache.stats["a0"]
    assert st.loads == 1 and st.misses == 11 and st.hits == 0 and st.requests == 0  # counted by the engine
    cache.release(held)
    cache.release(acquire(cache, "a0"))
    assert cache.stats["a0"].hits == 1 and cache.stats["a0"].loads == 1


def test_lru_evicts_idle_adapters_only(cache: AdapterCache) -> None:
    a0 = acquire(cache, "a0")  # held
    cache.release(acquire(cache, "a1"))
    cache.release(acquire(cache, "a2"))  # two slots: a1 (idle) goes, a0 (held) stays
    assert {e.source.name for e in cache.resident()} == {"a0", "a2"}
    assert cache.stats["a1"].evictions == 1
    src = [cache.resolve("a3")]
    a2 = acquire(cache, "a2")
    assert cache.try_acquire(src, first_try=True) is None  # both slots held: a3 waits
    time.sleep(0.05)
    assert cache.try_acquire(src, first_try=False) is None
    cache.release(a2)
    cache.release(acquire(cache, "a3"))
    assert {e.source.name for e in cache.resident()} == {"a0", "a3"}
    cache.release(a0)


def test_pinned_adapter_is_never_evicted(cache: AdapterCache) -> None:
    cache.pin("a4")
    cache.wait_ready("a4")
    for name in ("a0", "a1", "a2", "a3"):
        cache.release(acquire(cache, name))
    assert "a4" in {e.source.name for e in cache.resident()}
    assert cache.stats.get("a4") is None or cache.stats["a4"].evictions == 0


def test_unload_frees_the_slot_and_the_weights(cache: AdapterCache) -> None:
    cache.release(acquire(cache, "a0"))
    layer = next(iter(cache.slots.layers.values()))
    slot = cache.entries["a0"].slot
    assert layer.A[slot].abs().sum() > 0
    assert cache.unload("a0")
    assert layer.A[slot].abs().sum() == 0 and slot in cache.free
    # nothing of a loaded adapter's host tensors outlives its load
    a = read_adapter(cache.finder.root / "a1")
    ref = weakref.ref(a.tensors[next(iter(a.tensors))])
    cache.load("copy", cache.finder.root / "a1")
    del a
    cache.wait_ready("copy")
    gc.collect()
    assert ref() is None


def test_unknown_names_are_refused_without_naming_the_others(cache: AdapterCache) -> None:
    with pytest.raises(UnknownAdapterError, match=r"'nope' not found$"):
        cache.resolve("nope")
    for bad in ("../etc", "x" * 300, "a0/../a1"):
        with pytest.raises(UnknownAdapterError, match="not a valid"):
            cache.resolve(bad)


def test_a_path_cannot_take_over_a_served_name_and_a_failed_load_leaves_no_trace(
    cache: AdapterCache, tmp_path: Path
) -> None:
    with pytest.raises(AdapterError, match="served from the adapters on disk"):
        cache.load("a0", tmp_path / "a1")
    assert cache.resolve("a0").path == tmp_path / "a0"
    broken = tmp_path / "elsewhere" / "b"
    shutil.copytree(tmp_path / "a1", broken)
    (broken / WEIGHTS_FILE).write_bytes((broken / WEIGHTS_FILE).read_bytes()[:200])
    free = list(cache.free)
    with pytest.raises(AdapterError, match="truncated or corrupt") as e:
        cache.load("b", broken)
    assert e.value.public is not None and str(broken) not in e.value.public
    assert "b" not in cache.names() and "b" not in cache.stats and cache.free == free and not cache.entries


def test_requests_fail_at_once_when_every_slot_is_pinned(cache: AdapterCache) -> None:
    cache.pin("a0")
    cache.pin("a1")
    cache.wait_ready("a0")
    cache.wait_ready("a1")
    with pytest.raises(AdapterError, match="pinned"):
        cache.try_acquire([cache.resolve("a2")], first_try=True)
    cache.release(acquire(cache, "a0"))  # pinned adapters themselves still serve


def test_versions_resolve_to_the_highest_or_the_named_one(tiny_dir: Path, tmp_path: Path) -> None:
    for v in ("1", "2", "10"):
        write(tiny_dir, tmp_path / "summ" / v, seed=int(v))
    model, _ = load_checkpoint(tiny_dir)
    c = AdapterCache(AdapterSlots(model, 1, 8), tmp_path)
    assert c.resolve("summ").version == "10" and c.resolve("summ@2").path == tmp_path / "summ" / "2"
    assert "summ@2" in c.names()
    with pytest.raises(UnknownAdapterError, match="has no version '3'"):
        c.resolve("summ@3")
    c.close()


def test_corrupt_adapter_fails_its_requests_only(tiny_dir: Path, tmp_path: Path) -> None:
    write(tiny_dir, tmp_path / "good", seed=1)
    bad = write(tiny_dir, tmp_path / "bad", seed=2)
    data = (bad / WEIGHTS_FILE).read_bytes()
    (bad / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    other_base = write(tiny_dir, tmp_path / "other", seed=3)
    shutil.copy(tmp_path / "good" / "adapter_config.json", other_base / "adapter_config.json")
    engine = make_engine(tiny_dir, tmp_path)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    try:
        with pytest.raises(AdapterError, match="truncated or corrupt"):
            engine.cache.load("bad")
        outs = [list(engine.run([5, 6, 7], params, [(engine.cache.resolve(n), 1.0)])) for n in ("bad", "good")]
        assert "truncated or corrupt" in str(outs[0][-1].error)
        assert outs[1][-1].error is None
        good = [o.token for o in outs[1] if o.token is not None]
        assert good == offline(tiny_dir, tmp_path / "good", [5, 6, 7], params)
    finally:
        engine.stop()


def test_hot_swap_in_flight_requests_keep_old_weights(tiny_dir: Path, tmp_path: Path) -> None:
    old = write(tiny_dir, tmp_path / "v1", seed=1)
    new = write(tiny_dir, tmp_path / "v2", seed=2)
    live = tmp_path / "live"
    engine = make_engine(tiny_dir, live.parent / "none", max_len=128)
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    try:
        shutil.copytree(old, live)
        engine.cache.load("task", live)
        engine.cache.wait_ready("task")
        first = engine.submit([5, 6, 7], params, [(engine.cache.resolve("task"), 1.0)])
        time.sleep(0.02)
        assert not first.done
        engine.cache.load("task", new)  # replace while `first` is running
        second = list(engine.run([5, 6, 7], params, [(engine.cache.resolve("task"), 1.0)]))
        while not first.done:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert first.token_ids == offline(tiny_dir, old, [5, 6, 7], params)
    assert [o.token for o in second if o.token is not None] == offline(tiny_dir, new, [5, 6, 7], params)
