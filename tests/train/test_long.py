"""Examples longer than the limit keep what is learned: the middle of the user text goes, the completion
stays whole; and `auto` picks the limit from the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graftlm.loading.checkpoint import load_checkpoint
from graftlm.model.tokenizer import Tokenizer
from graftlm.train.data import DataError, encode_file, fit_examples
from graftlm.train.long import MARKER, auto_limit

INSTRUCTION = "Summarize this dialogue in one line."
DIALOGUE = " ".join(f"Speaker {i % 2}: the quick brown fox number {i} jumps over the lazy dog." for i in range(40))
ANSWER = "Two speakers talk about many foxes and a lazy dog."


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> Tokenizer:
    return load_checkpoint(tiny_dir)[1]


def chat(system: str = "You are brief.") -> dict:
    return {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"{INSTRUCTION}\n\n{DIALOGUE}"},
            {"role": "assistant", "content": ANSWER},
        ]
    }


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def targets_of(tok: Tokenizer, ids: tuple[int, ...], targets: tuple[bool, ...]) -> list[int]:
    return [i for i, t in zip(ids, targets, strict=True) if t]


def test_an_over_long_chat_example_loses_the_middle_of_its_user_text_only(tok: Tokenizer, tmp_path: Path) -> None:
    path = write(
        tmp_path / "d.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, chat()],
    )
    (short, whole) = encode_file(path, tok)
    limit = len(whole.ids) // 2
    (kept, cut), report = fit_examples([short, whole], tok, limit)
    assert len(cut) <= limit and len(kept) == len(short.ids)
    # the tokens trained on are exactly the completion's, all of them
    assert targets_of(tok, cut.ids, cut.targets) == targets_of(tok, tuple(whole.ids), tuple(whole.targets))
    text = tok.decode(list(cut.ids), skip_special=False)
    assert "You are brief." in text and INSTRUCTION in text and MARKER.strip() in text and ANSWER in text
    head, _, tail = text.partition(MARKER.strip())
    assert DIALOGUE[:40] in head and DIALOGUE[-30:] in tail  # the start and the end of the user text stay
    assert DIALOGUE not in text
    assert (report.prompt_cut, report.completion_cut, report.dropped) == (1, 0, 0)
    assert report.prompt_tokens == len(whole.ids) - len(cut.ids)
    assert "1 lost the middle of their prompt" in report.line()


def test_a_completion_alone_over_the_limit_is_cut_at_its_end_and_counted(tok: Tokenizer, tmp_path: Path) -> None:
    row = chat()
    row["messages"][-1]["content"] = ANSWER * 20
    (e,) = encode_file(write(tmp_path / "d.jsonl", [row]), tok)
    (cut,), report = fit_examples([e], tok, 64)
    assert len(cut) == 64 and cut.n_targets > 0 and report.completion_cut == 1
    assert DIALOGUE[:20] not in tok.decode(list(cut.ids), skip_special=False)  # the user text went first


def test_the_other_choices(tok: Tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [chat(), {"text": "short"}])
    encoded = encode_file(path, tok)
    limit = len(encoded[0].ids) - 10
    with pytest.raises(DataError, match=rf"d\.jsonl:1: example has \d+ tokens, more than max length {limit}"):
        fit_examples(encoded, tok, limit, "reject")
    kept, report = fit_examples(encoded, tok, limit, "drop")
    assert [e.source for e in kept] == [f"{path}:2"] and report.dropped == 1
    (end, _), report = fit_examples(encoded, tok, limit, "truncate-end")
    assert end.ids == tuple(encoded[0].ids[:limit]) and report.end_cut == 1 and report.end_tokens == 10
    with pytest.raises(Exception, match="on_long must be one of"):
        fit_examples(encoded, tok, limit, "chop")


def test_auto_fits_most_examples_within_the_budget() -> None:
    lengths = [100] * 95 + [300, 400, 500, 900, 3000]
    limit, why = auto_limit(lengths, batch_size=8, context=2048)
    assert limit == 960 and "1 of 100 examples are longer" in why  # the 99th percentile, rounded up to 64
    limit, why = auto_limit(lengths, batch_size=32, context=2048)
    assert limit == 256 and "8192 tokens per batch of 32" in why
    assert auto_limit([50, 60], 8, 2048)[0] == 64
    assert auto_limit([5000] * 10, 1, 2048)[0] == 2048
