"""One request cannot hurt another: bad settings, a broken adapter or a failing row fail that request
alone, and the others give exactly the tokens they give alone (checked against the offline generator)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from graftlm.engine.adapter_finder import Source
from graftlm.engine.engine import Engine, EngineConfig, EngineOverloadedError, NonFiniteOutputError
from graftlm.engine.request import Output
from graftlm.engine.sampling import SamplingParams
from graftlm.engine.sequence import Decoding
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.config import AdapterError, LoraConfig
from graftlm.lora.peft_io import save_adapter
from tests.engine.test_engine import offline
from tests.lora.helpers import random_adapter

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
CONFIG = LoraConfig(r=4, alpha=8)


@pytest.fixture(scope="module")
def adapters_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("isolation")
    good = random_adapter(tiny_dir, CONFIG, seed=1)
    save_adapter(out / "good", CONFIG, good.tensors, good.base_fingerprint)
    # finite weights so large that the forward overflows: passes every load check, gives NaN logits
    huge = {k: torch.full_like(t, 3e38 if "lora_B" in k else 1e4) for k, t in good.tensors.items()}
    save_adapter(out / "huge", CONFIG, huge, good.base_fingerprint, dtype="float32")
    nan = {k: t.clone() for k, t in good.tensors.items()}
    next(iter(nan.values()))[0, 0] = float("nan")
    save_adapter(out / "nan", CONFIG, nan, good.base_fingerprint)
    return out


def engine_for(tiny_dir: Path, adapters_dir: Path, **overrides: object) -> Engine:
    """An engine not yet running: requests submitted before `start` are admitted (and packed) together."""
    model, tok = load_checkpoint(tiny_dir)
    config = EngineConfig(**{"max_batch": 4, "max_len": 96, "prefill_tokens": 64, **overrides})
    return Engine(model, tok, config, adapters_dir)


class Collector:
    def __init__(self) -> None:
        self.outs: list[Output] = []
        self.done = threading.Event()

    def __call__(self, o: Output) -> None:
        self.outs.append(o)
        if o.finish_reason or o.error:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        assert self.done.wait(60)
        assert self.outs[-1].error is None, self.outs[-1].error
        return [o.token for o in self.outs if o.token is not None]

    @property
    def error(self) -> Exception | None:
        assert self.done.wait(60)
        return self.outs[-1].error


def submit(
    engine: Engine, prompt: list[int], params: SamplingParams, adapters: list[tuple[Source, float]] = ()
) -> Collector:
    c = Collector()
    engine.submit(prompt, params, adapters, c)
    return c


def test_an_overflowing_adapter_fails_alone_in_a_packed_prefill_and_leaves_its_row_clean(
    tiny_dir: Path, adapters_dir: Path
) -> None:
    engine = engine_for(tiny_dir, adapters_dir)
    huge = [(engine.cache.resolve("huge"), 1.0)]
    engine.cache.pin("huge")
    engine.cache.wait_ready("huge")
    try:
        base = submit(engine, [5, 6, 7, 8], GREEDY)
        bad = submit(engine, [9, 10, 11], GREEDY, huge)
        other = submit(engine, [12, 13], GREEDY)
        engine.start()  # all three are packed into one prefill
        assert isinstance(bad.error, NonFiniteOutputError)
        assert base.tokens == offline(tiny_dir, None, [5, 6, 7, 8], GREEDY)
        assert other.tokens == offline(tiny_dir, None, [12, 13], GREEDY)
        # later requests reuse the rows the broken one wrote: their answers are unchanged
        again = [submit(engine, [14 + i, 15, 16], GREEDY) for i in range(4)]
        for i, c in enumerate(again):
            assert c.tokens == offline(tiny_dir, None, [14 + i, 15, 16], GREEDY)
        assert engine.step_errors == 0
    finally:
        engine.stop()


def test_an_overflowing_adapter_fails_alone_while_decoding(tiny_dir: Path, adapters_dir: Path) -> None:
    engine = engine_for(tiny_dir, adapters_dir, prefill_tokens=4).start()
    try:
        running = [
            submit(engine, [20 + i, 21, 22], SamplingParams(max_new_tokens=40, ignore_eos=True)) for i in range(2)
        ]
        time.sleep(0.05)
        bad = submit(engine, [30, 31, 32, 33, 34, 35], GREEDY, [(engine.cache.resolve("huge"), 1.0)])
        assert isinstance(bad.error, NonFiniteOutputError)
        for i, c in enumerate(running):
            assert c.tokens == offline(
                tiny_dir, None, [20 + i, 21, 22], SamplingParams(max_new_tokens=40, ignore_eos=True)
            )
    finally:
        engine.stop()


def test_bad_seeds_temperatures_and_weights_hurt_nobody(tiny_dir: Path, adapters_dir: Path) -> None:
    engine = engine_for(tiny_dir, adapters_dir)
    good = engine.cache.resolve("good")
    try:
        for w in (float("nan"), float("inf"), 1e30, -11.0):
            with pytest.raises(ValueError, match="a finite number within"):
                engine.submit([5, 6], GREEDY, [(good, w)])
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=float("nan"))
        base = submit(engine, [5, 6, 7, 8], GREEDY)
        mixed = submit(engine, [5, 6, 7, 8], GREEDY, [(good, 1.0)])
        big_seed = submit(engine, [9, 10], SamplingParams(max_new_tokens=12, temperature=0.8, seed=2**64 + 5))
        tiny_t = submit(engine, [9, 10], SamplingParams(max_new_tokens=12, temperature=1e-300, ignore_eos=True))
        engine.start()
        assert base.tokens == offline(tiny_dir, None, [5, 6, 7, 8], GREEDY)
        assert mixed.tokens == offline(tiny_dir, adapters_dir / "good", [5, 6, 7, 8], GREEDY)
        # a seed past 2^64 is taken modulo 2^64; a temperature under the floor is greedy
        assert big_seed.tokens == offline(
            tiny_dir, None, [9, 10], SamplingParams(max_new_tokens=12, temperature=0.8, seed=5)
        )
        assert tiny_t.tokens == offline(tiny_dir, None, [9, 10], GREEDY)
    finally:
        engine.stop()


def test_an_adapter_file_holding_nan_is_refused_at_load(tiny_dir: Path, adapters_dir: Path) -> None:
    engine = engine_for(tiny_dir, adapters_dir)
    try:
        base = submit(engine, [5, 6, 7, 8], GREEDY)
        nan = submit(engine, [5, 6, 7, 8], GREEDY, [(engine.cache.resolve("nan"), 1.0)])
        engine.start()
        assert isinstance(nan.error, AdapterError) and nan.error.public == "its weights hold NaN or infinite values"
        assert base.tokens == offline(tiny_dir, None, [5, 6, 7, 8], GREEDY)
        with pytest.raises(AdapterError, match="NaN"):
            engine.cache.load("nan2", adapters_dir / "nan")
    finally:
        engine.stop()


def test_a_row_that_fails_choosing_its_token_fails_alone(
    tiny_dir: Path, adapters_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    choose: Callable = Decoding.choose

    def flaky(self: Decoding, logits: torch.Tensor) -> int:
        if self.params.seed == 666 and self.produced == 3:
            raise RuntimeError("this row's sampler broke")
        return choose(self, logits)

    monkeypatch.setattr(Decoding, "choose", flaky)
    engine = engine_for(tiny_dir, adapters_dir)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.7, seed=1, ignore_eos=True)
    try:
        others = [submit(engine, [5 + i, 6, 7], sampled) for i in range(3)]
        broken = submit(engine, [8, 9], SamplingParams(max_new_tokens=12, temperature=0.7, seed=666))
        engine.start()
        assert "sampler broke" in str(broken.error)
        for i, c in enumerate(others):
            assert c.tokens == offline(tiny_dir, None, [5 + i, 6, 7], sampled)
        assert not engine.cache.entries or all(e.refs == 0 for e in engine.cache.entries.values())
        assert engine.step_errors == 0
    finally:
        engine.stop()


def test_tenants_take_turns_for_rows(tiny_dir: Path, adapters_dir: Path) -> None:
    """One tenant floods the queue; another's single request gets the next free row, not the last."""
    engine = engine_for(tiny_dir, adapters_dir, max_batch=2, max_queued_per_tenant=30)
    long = SamplingParams(max_new_tokens=30, ignore_eos=True)
    order: list[str] = []
    lock = threading.Lock()

    def sink(tag: str) -> Callable[[Output], None]:
        def put(o: Output) -> None:
            if o.finish_reason or o.error:
                with lock:
                    order.append(tag)

        return put

    try:
        for i in range(30):
            engine.submit([5, 6, 7 + i], long, (), sink("flood"), tenant="flood")
        with pytest.raises(EngineOverloadedError, match="30 of your requests"):
            engine.submit([5, 6], long, (), sink("flood"), tenant="flood")
        engine.submit([8, 9], long, (), sink("quiet"), tenant="quiet")
        engine.start()
        deadline = time.monotonic() + 120
        while len(order) < 31 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        engine.stop()
    assert len(order) == 31
    assert order.index("quiet") <= 2  # it ran in the first free row, beside the flood's first
