"""The serving engine on a tiny random model: continuous batching with a different adapter per row gives
each request exactly the tokens the offline generator gives for that adapter alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from graftlm.engine.engine import Engine, EngineConfig
from graftlm.engine.generate import Generator
from graftlm.engine.request import Output
from graftlm.engine.sampling import SamplingParams
from graftlm.errors import PromptTooLongError
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.loading.merged import load_merged
from graftlm.lora.peft_io import save_adapter
from tests.lora.helpers import EIGHT, random_adapter


@pytest.fixture(scope="module")
def adapters_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The eight test adapters (ranks 1 to 16, different targets and layers, two DoRA) as PEFT folders."""
    out = tmp_path_factory.mktemp("adapters")
    for i, config in enumerate(EIGHT):
        a = random_adapter(tiny_dir, config, seed=i)
        save_adapter(out / f"a{i}", config, a.tensors, a.base_fingerprint)
    return out


def make_engine(tiny_dir: Path, adapters_dir: Path, **overrides: object) -> Engine:
    model, tok = load_checkpoint(tiny_dir)
    config = EngineConfig(**{"max_batch": 4, "max_len": 96, "prefill_tokens": 16, **overrides})
    return Engine(model, tok, config, adapters_dir).start()


def offline(tiny_dir: Path, adapter: Path | None, prompt: list[int], params: SamplingParams) -> list[int]:
    model, tok, _ = load_merged(str(tiny_dir), adapter)
    return Generator(model, tok).generate([prompt], params)[0].token_ids


def collect(engine: Engine, reqs: list[tuple[list[int], SamplingParams, str | None]]) -> list[list[Output]]:
    """Submit every request from its own thread, staggered, and gather each one's outputs."""
    outs: list[list[Output]] = [[] for _ in reqs]
    done = [threading.Event() for _ in reqs]

    def sink(i: int) -> Callable[[Output], None]:
        def put(o: Output) -> None:
            outs[i].append(o)
            if o.finish_reason or o.error:
                done[i].set()

        return put

    for i, (prompt, params, name) in enumerate(reqs):
        adapters = [] if name is None else [(engine.cache.resolve(name), 1.0)]
        engine.submit(prompt, params, adapters, sink(i))
        time.sleep(0.003 * (i % 3))  # requests arrive while others run
    for d in done:
        assert d.wait(60)
    return outs


def test_mixed_adapters_join_and_leave_match_offline(tiny_dir: Path, adapters_dir: Path) -> None:
    engine = make_engine(tiny_dir, adapters_dir)
    try:
        tok = engine.tokenizer
        g = torch.Generator().manual_seed(3)
        reqs = []
        names = [f"a{i}" for i in range(8)] + [None]
        for i in range(14):
            n = [3, 9, 17, 30, 40][i % 5]  # 30 and 40 are prefilled in chunks of 16
            prompt = torch.randint(3, tok.vocab_size, (n,), generator=g).tolist()
            params = SamplingParams(max_new_tokens=[4, 12, 20, 7][i % 4], ignore_eos=True)
            reqs.append((prompt, params, names[i % len(names)]))
        outs = collect(engine, reqs)
    finally:
        engine.stop()
    assert engine.peak_batch == 4  # requests really ran together
    for (prompt, params, name), out in zip(reqs, outs, strict=True):
        assert out[-1].error is None, out[-1].error
        got = [o.token for o in out if o.token is not None]
        want = offline(tiny_dir, None if name is None else adapters_dir / name, prompt, params)
        assert got == want, name
        assert out[-1].finish_reason == "length"


def test_sampled_rows_follow_their_seed(tiny_dir: Path, adapters_dir: Path) -> None:
    engine = make_engine(tiny_dir, adapters_dir)
    prompt = engine.tokenizer.encode("The quick brown fox")
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    try:
        outs = collect(engine, [(prompt, params, "a1"), (prompt, params, "a1"), (prompt, params, None)])
    finally:
        engine.stop()
    tokens = [[o.token for o in out if o.token is not None] for out in outs]
    assert tokens[0] == tokens[1] == offline(tiny_dir, adapters_dir / "a1", prompt, params)
    assert tokens[2] == offline(tiny_dir, None, prompt, params)


def test_weighted_mix_of_two_adapters(tiny_dir: Path, adapters_dir: Path) -> None:
    engine = make_engine(tiny_dir, adapters_dir)
    prompt = engine.tokenizer.encode("Hi there")
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    try:
        mix = [(engine.cache.resolve("a0"), 0.5), (engine.cache.resolve("a1"), 0.5)]
        got = [o.token for o in engine.run(prompt, params, mix) if o.token is not None]
        alone = [o.token for o in engine.run(prompt, params, mix[:1]) if o.token is not None]
        dora = [(engine.cache.resolve("a5"), 1.0), (engine.cache.resolve("a0"), 1.0)]
        refused = list(engine.run(prompt, params, dora))
    finally:
        engine.stop()
    # the reference: a0 and a1 merged into the weights at half strength each
    model, tok = load_checkpoint(tiny_dir)
    for name in ("a0", "a1"):
        from graftlm.lora.peft_io import read_adapter

        a = read_adapter(adapters_dir / name)
        with torch.no_grad():
            for path in a.modules():
                key = f"base_model.model.{path}"
                proj = model.get_submodule(path.removeprefix("model."))
                delta = a.tensors[f"{key}.lora_B.weight"] @ a.tensors[f"{key}.lora_A.weight"]
                proj.weight += 0.5 * a.config.scale(path) * delta
    assert got == Generator(model, tok).generate([prompt], params)[0].token_ids
    assert got != alone
    assert refused[-1].error is not None and "DoRA" in str(refused[-1].error)


def test_prompt_longer_than_context_is_refused(tiny_dir: Path, adapters_dir: Path) -> None:
    engine = make_engine(tiny_dir, adapters_dir)
    try:
        with pytest.raises(PromptTooLongError, match="96"):
            engine.submit(list(range(3, 99)), SamplingParams())
        # a prompt that fits is cut to the context: it ends with "length"
        out = list(engine.run(list(range(3, 90)), SamplingParams(max_new_tokens=50, ignore_eos=True)))
        assert out[-1].finish_reason == "length" and len([o for o in out if o.token is not None]) == 96 - 87
    finally:
        engine.stop()


def test_cancelled_request_frees_its_row(tiny_dir: Path, adapters_dir: Path) -> None:
    engine = make_engine(tiny_dir, adapters_dir, max_batch=1, max_len=2048)
    started = threading.Event()
    try:
        params = SamplingParams(max_new_tokens=2000, ignore_eos=True)
        long = engine.submit([5, 6, 7], params, sink=lambda o: started.set())
        assert started.wait(10)
        long.cancel()
        # with one row, this request runs only once the cancelled one has left
        out = list(engine.run([5, 6], SamplingParams(max_new_tokens=3, ignore_eos=True)))
        assert out[-1].finish_reason == "length"
        assert long.done and len(long.token_ids) < 2000
    finally:
        engine.stop()


def test_a_second_engine_loop_is_refused_and_offline_jobs_use_the_running_one(
    tiny_dir: Path, adapters_dir: Path
) -> None:
    """Two loops stepping one engine's rows corrupted them (found running offline jobs on a started engine)."""
    from graftlm.engine.offline import Job, run_jobs

    engine = make_engine(tiny_dir, adapters_dir, max_batch=8, prefill_tokens=16)
    try:
        with pytest.raises(RuntimeError, match="already running"):
            engine.run_forever()
        tok = engine.tokenizer
        params = SamplingParams(max_new_tokens=8)
        jobs = [
            Job(tok.encode(f"request {n}"), params, () if n % 5 == 4 else ((engine.cache.resolve(f"a{n % 4}"), 1.0),))
            for n in range(12)
        ]
        got = [f.token_ids for f in run_jobs(engine, jobs)]
    finally:
        engine.stop()
    for job, tokens in zip(jobs, got, strict=True):
        adapter = adapters_dir / f"a{int(tok.decode(job.prompt).split()[-1]) % 4}" if job.adapters else None
        assert tokens == offline(tiny_dir, adapter, job.prompt, params)


def test_speculative_rows_give_the_plain_tokens_and_count_their_drafts(
    tiny_dir: Path, adapters_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows with drafts (some right, some wrong) verified in one step beside rows without: every greedy
    row gets exactly the plain decoder's tokens, and the drafts are counted per adapter."""
    import graftlm.engine.engine as engine_module
    from graftlm.server.metrics import render_metrics

    tok = load_checkpoint(tiny_dir)[1]
    texts = ["the quick brown fox the quick brown fox the quick", "Meeting on Tuesday at 3pm. Meeting on", "teh cat"]
    names = ["a0", "a3", None, "a6", "a1"]  # a6: DoRA
    reqs = []
    for i in range(10):  # distinct prompts: the oracle below knows each one's answer
        params = SamplingParams(max_new_tokens=[20, 40, 55][i % 3], ignore_eos=True)
        reqs.append(([3 + i, *tok.encode(texts[i % 3])], params, names[i % len(names)]))
    answers = {tuple(p): offline(tiny_dir, None if n is None else adapters_dir / n, p, q) for p, q, n in reqs}

    def oracle(history: list[int], k: int, memory: object = ()) -> list[int]:
        """The true continuation, its last token wrong for every other prompt; none for row 9 (plain rows)."""
        for prompt, answer in answers.items():
            if tuple(history[: len(prompt)]) == prompt and prompt[0] != 12:
                done = len(history) - len(prompt)
                draft = list(answer[done : done + k])
                if draft and prompt[0] % 2:
                    draft[-1] = (draft[-1] + 1) % tok.vocab_size
                return draft
        return []

    monkeypatch.setattr(engine_module, "propose", oracle)
    engine = make_engine(tiny_dir, adapters_dir, speculate="ngram", spec_tokens=5)
    try:
        sampled = SamplingParams(max_new_tokens=12, temperature=0.8, seed=1, ignore_eos=True)
        outs = collect(engine, [*reqs, (reqs[0][0], sampled, "a0")])
        metrics = render_metrics(engine)
    finally:
        engine.stop()
    for (prompt, _, name), out in zip(reqs, outs[:-1], strict=True):
        assert out[-1].error is None, out[-1].error
        assert [o.token for o in out if o.token is not None] == answers[tuple(prompt)], name
    assert outs[-1][-1].finish_reason == "length" and len([o for o in outs[-1] if o.token is not None]) == 12
    stats = engine.cache.stats
    drafted, accepted = sum(s.drafted for s in stats.values()), sum(s.accepted for s in stats.values())
    assert 0 < accepted < drafted  # right drafts were taken, wrong ones refused
    assert engine.tokens_generated == sum(p.max_new_tokens for _, p, _ in reqs) + 12
    assert engine.decode_steps < engine.tokens_generated - 11 * 2  # fewer forwards than tokens
    assert f'graftlm_adapter_accepted_total{{adapter="a0"}} {stats["a0"].accepted}' in metrics
    assert f'graftlm_adapter_drafted_total{{adapter="a0"}} {stats["a0"].drafted}' in metrics
    assert len(engine.answers.store) == 5  # an answer memory per adapter (one tenant)


def test_speculation_drafts_from_earlier_answers_of_the_same_tenant_and_adapter(
    tiny_dir: Path, adapters_dir: Path
) -> None:
    engine = make_engine(tiny_dir, adapters_dir, speculate="ngram", spec_tokens=5)
    tok = engine.tokenizer
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    prompt = tok.encode("teh cat")
    src = engine.cache.resolve("a1")
    try:
        first = [o.token for o in engine.run(prompt, params, [(src, 1.0)]) if o.token is not None]
        drafted = engine.cache.stat("a1").accepted
        again = [o.token for o in engine.run(prompt, params, [(src, 1.0)]) if o.token is not None]
        other = engine.submit(prompt, params, [(src, 1.0)], tenant="b")
        while not other.done:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert again == first == other.token_ids
    # the second answer is the first again: drafted from memory, nearly every token accepted
    assert engine.cache.stat("a1").accepted - drafted >= 20
    assert {key[0] for key in engine.answers.store} == {"", "b"}  # one memory per tenant


def test_speculation_settings_are_checked(tiny_dir: Path, adapters_dir: Path) -> None:
    from graftlm.errors import ConfigError

    with pytest.raises(ConfigError, match="between 1 and 16"):
        make_engine(tiny_dir, adapters_dir, speculate="ngram", spec_tokens=17)
