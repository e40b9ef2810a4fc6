"""Generation on a tiny random model: batching, streaming, stops, seeds, limits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from graftlm.engine.generate import Generator
from graftlm.engine.sampling import SamplingParams
from graftlm.errors import PromptTooLongError
from graftlm.loading.checkpoint import load_checkpoint
from tests.conftest import hf_greedy

PROMPTS = [
    "The quick brown fox",
    "Summarize this email in one line, please. Meeting on Tuesday at 3pm",
    "Hi",
    "Proofread: teh cat sat",
    "Numbers like 12345 and 2024-11-23 appear in text too! The quick brown fox jumps",
]


@pytest.fixture(scope="module")
def gen(tiny_dir: Path) -> Generator:
    model, tok = load_checkpoint(tiny_dir)
    return Generator(model, tok)


def _ids(gen: Generator) -> list[list[int]]:
    return [gen.tokenizer.encode(p) for p in PROMPTS]


def test_greedy_matches_transformers(gen: Generator, tiny_dir: Path) -> None:
    ref = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    for p in _ids(gen)[:3]:
        ours = gen.generate([p], SamplingParams(max_new_tokens=32, ignore_eos=True))[0]
        assert ours.token_ids == hf_greedy(ref, p, 32)


def test_batched_equals_each_prompt_alone(gen: Generator) -> None:
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = _ids(gen)
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ
    batched = gen.generate(prompts, params)
    for p, b in zip(prompts, batched, strict=True):
        assert gen.generate([p], params)[0].token_ids == b.token_ids


def test_batched_sampling_with_seeds_equals_alone(gen: Generator) -> None:
    per_row = [
        SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=i) for i in range(len(PROMPTS))
    ]
    batched = gen.generate(_ids(gen), per_row)
    for p, sp, b in zip(_ids(gen), per_row, batched, strict=True):
        assert gen.generate([p], sp)[0].token_ids == b.token_ids


def test_same_seed_same_tokens_other_seed_differs(gen: Generator) -> None:
    p = _ids(gen)[0]
    runs = [
        gen.generate([p], SamplingParams(max_new_tokens=20, temperature=1.5, seed=s))[0].token_ids for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_stream_concatenates_to_the_completion(gen: Generator) -> None:
    p = _ids(gen)[1]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    pieces = list(gen.stream(p, params))
    assert len(pieces) > 1
    assert "".join(pieces) == gen.generate([p], params)[0].text


def test_stop_string_cuts_the_text(gen: Generator) -> None:
    p = _ids(gen)[0]
    full = gen.generate([p], SamplingParams(max_new_tokens=40, ignore_eos=True))[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = gen.generate([p], SamplingParams(max_new_tokens=40, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert "".join(gen.stream(p, SamplingParams(max_new_tokens=40, ignore_eos=True, stop=(stop,)))) == cut.text


def test_max_new_tokens_gives_length(gen: Generator) -> None:
    out = gen.generate([_ids(gen)[0]], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_generation_stops_at_the_context_window(gen: Generator) -> None:
    window = gen.context_window
    prompt = (_ids(gen)[4] * 50)[: window - 3]
    out = gen.generate([prompt], SamplingParams(max_new_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_prompt_longer_than_context_is_refused(gen: Generator) -> None:
    prompt = (_ids(gen)[4] * 50)[: gen.context_window + 5]
    with pytest.raises(PromptTooLongError, match=f"{len(prompt)} tokens.*context window is {gen.context_window}"):
        gen.generate([prompt], SamplingParams())


def test_bad_sampling_settings_are_refused() -> None:
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_new_tokens": 0}, {"stop": ("",)}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)  # type: ignore[arg-type]
