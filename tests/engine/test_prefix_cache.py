"""The prefix cache: prompts that share a prefix reuse its keys and values, with the outputs they would
have had without it; adapters never share; memory stays within its bound."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graftlm.engine.kv_cache import KVCache, RowKVCache
from graftlm.engine.prefix_cache import BLOCK, PrefixCache
from graftlm.engine.sampling import SamplingParams
from graftlm.loading.checkpoint import load_checkpoint
from tests.engine.test_engine import adapters_dir, collect, make_engine, offline  # noqa: F401 (a fixture)

PREFIX = list(range(3, 3 + 3 * BLOCK + 5))  # three whole blocks and a bit


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [PREFIX + torch.randint(3, 200, (4 + i % 7,), generator=g).tolist() for i in range(n)]


def test_shared_prefixes_give_the_tokens_of_a_full_prefill(tiny_dir: Path, adapters_dir: Path) -> None:  # noqa: F811
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    reqs = [(p, params, None if i % 3 else "a0") for i, p in enumerate(prompts(9))]
    results = {}
    for mb in (0.0, 64.0):
        engine = make_engine(tiny_dir, adapters_dir, prefix_cache_mb=mb, max_len=160, prefill_tokens=64)
        try:
            outs = collect(engine, reqs)
        finally:
            engine.stop()
        results[mb] = [[o.token for o in out if o.token is not None] for out in outs]
        if mb:
            assert engine.prefix is not None
            assert engine.prefix.hits >= 5 and engine.prefix.tokens_reused >= 5 * 3 * BLOCK
            computed = sum(len(p) for p, _, _ in reqs) - engine.prefix.tokens_reused
            assert engine.prefill_tokens == computed  # the reused positions were not computed again
        else:
            assert engine.prefix is None
    assert results[64.0] == results[0.0]
    for (prompt, params, name), got in zip(reqs, results[64.0], strict=True):
        assert got == offline(tiny_dir, None if name is None else adapters_dir / name, prompt, params)


def test_restored_keys_give_the_logits_of_a_full_prefill(tiny_dir: Path) -> None:
    model, _ = load_checkpoint(tiny_dir)
    first, second = prompts(2)
    kv = RowKVCache(model.config, 2, 160)
    cache = PrefixCache(2**30)
    with torch.inference_mode():
        model(torch.tensor([first]), cache=kv.chunk(0, 1))
        cache.store((), first, kv, 0)
        n = cache.restore((), second, kv, 1)
        assert n == 3 * BLOCK
        got = model(torch.tensor([second[n:]]), cache=kv.chunk(1, 1), start=n)[0]
        want = model(torch.tensor([second]), cache=KVCache(model.config, 1, 160))[0, n:]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_keys_of_other_adapters_and_other_tokens_are_not_shared(tiny_dir: Path) -> None:
    model, _ = load_checkpoint(tiny_dir)
    kv = RowKVCache(model.config, 2, 160)
    cache = PrefixCache(2**30)
    with torch.inference_mode():
        model(torch.tensor([PREFIX]), cache=kv.chunk(0, 1))
    cache.store((("a0", (1, 2, 3), 1.0),), PREFIX, kv, 0)
    assert cache.restore((), [*PREFIX, 9], kv, 1) == 0  # the base model: another key
    assert cache.restore((("a0", (1, 2, 4), 1.0),), [*PREFIX, 9], kv, 1) == 0  # another version of a0
    changed = [PREFIX[0] + 1, *PREFIX[1:]]
    assert cache.restore((("a0", (1, 2, 3), 1.0),), [*changed, 9], kv, 1) == 0  # the first block differs
    # a whole cached prompt still leaves its last token to compute (its logits give the first token)
    assert cache.restore((("a0", (1, 2, 3), 1.0),), PREFIX[: 2 * BLOCK], kv, 1) == BLOCK


def test_memory_stays_within_its_bound_least_recently_used_first(tiny_dir: Path) -> None:
    model, _ = load_checkpoint(tiny_dir)
    kv = RowKVCache(model.config, 1, 160)
    block_bytes = 2 * kv.k[:, 0, :, :BLOCK].nbytes
    cache = PrefixCache(5 * block_bytes)
    old, new = [7] * (3 * BLOCK), [8] * (3 * BLOCK)
    cache.store((), old, kv, 0)
    cache.store((), new, kv, 0)
    assert cache.nbytes <= 5 * block_bytes and cache.evictions == 1
    assert cache.restore((), [*new, 1], kv, 0) == 3 * BLOCK  # the newest is whole
    assert cache.restore((), [*old, 1], kv, 0) == 2 * BLOCK  # the oldest lost its last block (a leaf)


def test_a_budget_of_zero_turns_it_off(tiny_dir: Path, adapters_dir: Path) -> None:  # noqa: F811
    engine = make_engine(tiny_dir, adapters_dir, prefix_cache_mb=0)
    engine.stop()
    assert engine.prefix is None


@pytest.mark.parametrize("mb", [1e-6])
def test_a_budget_below_one_block_caches_nothing(tiny_dir: Path, mb: float) -> None:
    model, _ = load_checkpoint(tiny_dir)
    kv = RowKVCache(model.config, 1, 160)
    cache = PrefixCache(int(mb * 2**20))
    cache.store((), PREFIX, kv, 0)
    assert cache.nbytes == 0 and cache.restore((), PREFIX, kv, 0) == 0
