"""Prompt-lookup speculation: drafts come from earlier text, greedy output equals plain decoding, and the
verification rule keeps the model's distribution when sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graftlm.engine.generate import Generator
from graftlm.engine.sampling import SamplingParams, filter_logits
from graftlm.engine.speculate import (
    ModelDrafter,
    SpecStats,
    check_draft,
    check_spec_tokens,
    propose,
    speculative_steps,
    verify,
)
from graftlm.errors import ConfigError
from graftlm.loading.checkpoint import load_checkpoint
from tests.conftest import write_tiny_checkpoint


def test_propose_copies_what_followed_the_latest_match() -> None:
    assert propose([5, 6, 7, 9, 5, 6, 7, 8, 1, 5, 6, 7], 3) == [8, 1, 5]  # the latest "5 6 7" wins
    assert propose([1, 2, 3, 4, 9, 3], 2) == []  # only a 1-gram matches: too weak by default
    assert propose([1, 2, 3, 4, 9, 3], 2, min_ngram=1) == [4, 9]
    assert propose([1, 2, 3], 4) == []
    assert propose([7], 4) == []


def test_propose_falls_back_to_earlier_answers_and_memory_is_bounded() -> None:
    from graftlm.engine.speculate import AnswerMemory

    memory = AnswerMemory(tokens=8, keys=2)
    memory.add("a", [1, 2, 3, 4])
    assert propose([9, 9, 1, 2], 3, memory=memory.get("a")) == [3, 4]  # not in the text: from the answers
    assert propose([1, 2, 7, 5, 1, 2], 3, memory=memory.get("a")) == [7, 5, 1]  # the text itself first
    memory.add("a", [5, 6, 7, 8, 9])
    assert memory.get("a") == [3, 4, -1, 5, 6, 7, 8, 9]  # the latest tokens kept, answers separated
    assert propose([0, 4, 5], 3, memory=memory.get("a")) == []  # no match runs across the separator
    assert propose([0, 5, 6], 2, memory=memory.get("a")) == [7, 8]
    assert propose([0, 3, 4], 3, memory=memory.get("a")) == []  # an answer's end drafts nothing after it
    memory.add("a", [3, 4, 1])
    assert propose([0, 3, 4], 3, memory=memory.get("a")) == [1]
    memory.add("b", [1])
    memory.add("c", [1])
    assert set(memory.store) == {"b", "c"}  # the least recently used key went


def test_spec_tokens_are_bounded() -> None:
    for bad in (0, 17, -1):
        with pytest.raises(ConfigError, match="between 1 and 16"):
            check_spec_tokens(bad)


def test_greedy_verification_keeps_the_agreeing_prefix_and_the_models_next_token() -> None:
    logits = torch.full((4, 10), -5.0)
    for i, t in enumerate((3, 4, 7, 1)):
        logits[i, t] = 5.0
    greedy = SamplingParams()
    assert verify(logits, [3, 4, 5], greedy, None) == [3, 4, 7]
    assert verify(logits, [3, 4, 7], greedy, None) == [3, 4, 7, 1]  # all accepted, plus one more
    assert verify(logits, [2, 4, 7], greedy, None) == [3]


def test_sampled_verification_keeps_the_target_distribution() -> None:
    """Whatever token is drafted, the first token out is distributed as the model's own sampling."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6) * 1.5
    params = SamplingParams(temperature=0.8, top_p=0.95)
    want = filter_logits(logits[0], params).softmax(-1)
    g = torch.Generator().manual_seed(1)
    n = 20_000
    for draft in (int(want.argmax()), int(want.argmin())):
        counts = torch.zeros(6)
        for _ in range(n):
            counts[verify(logits, [draft], params, g)[0]] += 1
        assert torch.allclose(counts / n, want, atol=0.015), (draft, counts / n, want)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_greedy_speculation_gives_the_plain_decoders_tokens(tiny_dir: Path, k: int) -> None:
    model, tok = load_checkpoint(tiny_dir)
    gen = Generator(model, tok)
    prompts = ["the quick brown fox the quick brown fox the quick", "Meeting on Tuesday at 3pm. Meeting on", "teh cat"]
    stats = SpecStats()
    for text in prompts:
        ids = tok.encode(text)
        params = SamplingParams(max_new_tokens=40, ignore_eos=True)
        want = gen.generate([ids], params)[0].token_ids
        got = [ev.token for ev in speculative_steps(model, tok, ids, params, k, stats)]
        assert got == want, text
    assert stats.tokens == 120 and stats.accepted > 0 and stats.forwards < 120  # drafts were taken


def test_generate_cli_speculates_and_reports(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graftlm.cli.main import main

    base = ["generate", "-m", str(tiny_dir), "--raw", "-n", "20", "the quick brown fox the quick brown fox"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(["-v", *base, "--speculate", "ngram"]) == 0
    got = capsys.readouterr()
    assert got.out == plain and "drafted tokens accepted" in got.err
    assert main([*base, "another prompt", "--speculate", "ngram"]) == 2
    assert "one prompt at a time" in capsys.readouterr().err
    assert main([*base, "--speculate", "ngram", "--spec-tokens", "0"]) == 2
    assert "between 1 and 16" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_speculation_with_a_draft_model_gives_the_plain_decoders_tokens(
    tiny_dir: Path, tmp_path: Path, seed: int
) -> None:
    model, tok = load_checkpoint(tiny_dir)
    draft, draft_tok = load_checkpoint(write_tiny_checkpoint(tmp_path / "draft", seed=seed))
    check_draft(model, tok, draft, draft_tok)
    gen, drafter = Generator(model, tok), ModelDrafter(draft)
    stats = SpecStats()
    for text in ["the quick brown fox jumps", "Meeting on Tuesday at 3pm. Meeting on", "teh cat"]:
        ids = tok.encode(text)
        params = SamplingParams(max_new_tokens=30, ignore_eos=True)
        want = gen.generate([ids], params)[0].token_ids
        got = [ev.token for ev in speculative_steps(model, tok, ids, params, 5, stats, drafter)]
        assert got == want, text
    assert stats.tokens == 90 and stats.drafted > 0
    if seed == 0:  # the draft is the target itself: every draft is the target's own greedy choice
        assert stats.accepted == stats.drafted and stats.forwards <= 90 // 6 + 3
    else:  # another random model: most drafts are rejected, the answer is the same
        assert stats.acceptance < 0.5


def test_a_draft_model_of_another_vocabulary_or_tokenizer_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    model, tok = load_checkpoint(tiny_dir)
    wider = load_checkpoint(write_tiny_checkpoint(tmp_path / "wider", vocab_size=tok.vocab_size + 8))
    with pytest.raises(ConfigError, match="vocabulary has"):
        check_draft(model, tok, *wider)
    other, other_tok = load_checkpoint(write_tiny_checkpoint(tmp_path / "other"))
    other_tok.backend.add_tokens(["<|zz|>"])  # same size of embedding table, another id for some text
    with pytest.raises(ConfigError, match="tokenizer differs"):
        check_draft(model, tok, other, other_tok)


def test_generate_cli_drafts_with_a_model_and_refuses_bad_flags(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from graftlm.cli.main import main

    base = ["generate", "-m", str(tiny_dir), "--raw", "-n", "20", "the quick brown fox"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(["-v", *base, "--speculate", "draft", "--draft", str(tiny_dir), "--spec-tokens", "4"]) == 0
    got = capsys.readouterr()
    assert got.out == plain and "drafted tokens accepted (100%)" in got.err
    assert main([*base, "--speculate", "draft"]) == 2
    assert "needs --draft" in capsys.readouterr().err
    assert main([*base, "--draft", str(tiny_dir)]) == 2
    assert "--speculate draft" in capsys.readouterr().err
    wider = write_tiny_checkpoint(tmp_path / "wider", vocab_size=300)
    assert main([*base, "--speculate", "draft", "--draft", str(wider)]) == 2
    assert "share the target's tokenizer" in capsys.readouterr().err
