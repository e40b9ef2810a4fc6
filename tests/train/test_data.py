"""JSONL formats, target masks, and the errors on bad lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graftlm.loading.checkpoint import load_checkpoint
from graftlm.model.tokenizer import Tokenizer
from graftlm.train.data import DataError, bucketed_batches, load_examples


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> Tokenizer:
    return load_checkpoint(tiny_dir)[1]


def _write(path: Path, rows: list) -> Path:  # type: ignore[type-arg]
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _target_text(tok: Tokenizer, ex) -> str:  # type: ignore[no-untyped-def]
    return tok.decode([i for i, t in zip(ex.ids, ex.targets, strict=True) if t], skip_special=False)


def test_chat_targets_are_the_assistant_turns(tok: Tokenizer, tmp_path: Path) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you."},
        ]
    }
    (ex,) = load_examples(_write(tmp_path / "d.jsonl", [row]), tok, 256)
    assert _target_text(tok, ex) == "Hello there.<|im_end|>\nSee you.<|im_end|>\n"
    assert tok.decode(ex.ids, skip_special=False) == tok.render_chat(row["messages"], add_generation_prompt=False)


def test_assistant_turn_with_weight_zero_is_not_learned(tok: Tokenizer, tmp_path: Path) -> None:
    row = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Bad.", "weight": 0},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Good."},
        ]
    }
    (ex,) = load_examples(_write(tmp_path / "d.jsonl", [row]), tok, 256)
    assert _target_text(tok, ex) == "Good.<|im_end|>\n"


def test_prompt_completion_raw_and_chat(tok: Tokenizer, tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [{"prompt": "The quick brown", "completion": " fox"}])
    (raw,) = load_examples(path, tok, 256, use_chat=False)
    assert _target_text(tok, raw) == " fox<|im_end|>"
    (chat,) = load_examples(path, tok, 256, use_chat=True)
    assert _target_text(tok, chat) == " fox<|im_end|>\n"
    assert "<|im_start|>user\nThe quick brown" in tok.decode(chat.ids, skip_special=False)


def test_text_is_learned_whole(tok: Tokenizer, tmp_path: Path) -> None:
    (ex,) = load_examples(_write(tmp_path / "d.jsonl", [{"text": "The quick brown fox"}]), tok, 256)
    assert ex.targets[0] is False and all(ex.targets[1:])


def test_malformed_line_is_reported_with_file_and_line(tok: Tokenizer, tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [{"text": "ok"}, "", '{"text": "broken"', {"text": "ok"}])
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        load_examples(path, tok, 256)


def test_bad_utf8_and_deep_nesting_are_reported_with_file_and_line(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8 \(byte 14 of the line\)"):
        load_examples(path, tok, 256)
    path.write_bytes(b'{"text": "ok"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: JSON nested too deeply"):
        load_examples(path, tok, 256)


def test_unknown_shape_is_reported(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"d\.jsonl:1: a line needs"):
        load_examples(_write(tmp_path / "d.jsonl", [{"input": "x", "output": "y"}]), tok, 256)


def test_example_without_completion_tokens_is_reported(tok: Tokenizer, tmp_path: Path) -> None:
    rows = [{"text": "fine"}, {"messages": [{"role": "user", "content": "no answer here"}]}]
    with pytest.raises(DataError, match=r"d\.jsonl:2: example has no completion tokens"):
        load_examples(_write(tmp_path / "d.jsonl", rows), tok, 256)


def test_over_long_example_is_truncated_or_rejected(tok: Tokenizer, tmp_path: Path) -> None:
    long = {"prompt": "Hi", "completion": " The quick brown fox jumps over the lazy dog." * 5}
    path = _write(tmp_path / "d.jsonl", [{"text": "short"}, long])
    cut = load_examples(path, tok, 24, on_long="truncate")
    assert len(cut[1]) == 24 and cut[1].n_targets > 0
    with pytest.raises(DataError, match=r"d\.jsonl:2: example has \d+ tokens, more than max length 24"):
        load_examples(path, tok, 24, on_long="reject")


def test_truncation_that_leaves_no_completion_is_reported(tok: Tokenizer, tmp_path: Path) -> None:
    row = {"prompt": "The quick brown fox jumps over the lazy dog. " * 5, "completion": "done"}
    with pytest.raises(DataError, match="no completion tokens to learn from after truncation"):
        load_examples(_write(tmp_path / "d.jsonl", [row]), tok, 16, on_long="truncate-end")


def test_buckets_cover_every_example_once_in_a_seeded_order(tok: Tokenizer, tmp_path: Path) -> None:
    rows = [{"text": "word " * (i % 17 + 1)} for i in range(100)]
    examples = load_examples(_write(tmp_path / "d.jsonl", rows), tok, 256)
    a = bucketed_batches(examples, 8, seed=1, epoch=0)
    assert sorted(e.source for b in a for e in b) == sorted(e.source for e in examples)
    assert a == bucketed_batches(examples, 8, seed=1, epoch=0)
    assert a != bucketed_batches(examples, 8, seed=1, epoch=1)

    def spread(batches: list) -> float:  # type: ignore[type-arg]
        return sum(max(map(len, b)) - min(map(len, b)) for b in batches) / len(batches)

    unsorted = [examples[i : i + 8] for i in range(0, len(examples), 8)]
    assert spread(a) < spread(unsorted) / 3  # similar lengths inside a batch


def test_batches_are_made_on_the_models_device() -> None:
    from graftlm.train.data import Example, collate

    batch = collate([Example((1, 2, 3), (False, True, True), "x:1")], pad_id=0, device="meta")
    assert batch.tokens.device.type == "meta" and batch.targets.device.type == "meta"
