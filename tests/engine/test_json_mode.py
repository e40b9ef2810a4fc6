"""JSON mode: the recognizer agrees with `json.loads`, the real tokens of a JSON document are always
allowed, and constrained generation that ends on its own ends with a valid object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from graftlm.engine.json_mode import DONE, START, JsonConstraint, JsonVocab, step
from graftlm.loading.checkpoint import load_checkpoint

VALID = [
    "{}",
    '{"a": 1}',
    '{"a": [1, -2.5e+3, true, false, null, {"b": "x\\"y\\u00e9\\n"}], "c": {}}',
    '{ "k" : [ ] , "z": 0.0 }',
]
INVALID = ["[1]", '{"a" 1}', '{"a": 01}', '{"a": tru}', '{"a": 1,}', "{a: 1}", '{"a": "\\x"}', '{"a": 1}}', '{"a": -}']


def accepts(text: str) -> bool:
    s = START
    for ch in text:
        s = step(s, ch)
        if s is None:
            return False
    return s[1] == DONE


@pytest.mark.parametrize("text", VALID)
def test_valid_objects_are_accepted(text: str) -> None:
    json.loads(text)
    assert accepts(text)


@pytest.mark.parametrize("text", INVALID)
def test_invalid_text_is_refused(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise json.JSONDecodeError("not an object", text, 0)
    assert not accepts(text)


@pytest.fixture(scope="module")
def vocab(tiny_dir: Path) -> JsonVocab:
    model, tok = load_checkpoint(tiny_dir)
    return JsonVocab(tok, model.config.vocab_size, tok.stop_ids(model.config.eos_token_id))


def test_the_tokens_of_a_document_are_allowed_and_eos_only_at_the_end(vocab: JsonVocab, tiny_dir: Path) -> None:
    _, tok = load_checkpoint(tiny_dir)
    for text in VALID:
        c = JsonConstraint(vocab)
        for t in tok.encode(text):
            allowed = c.allowed()
            assert allowed[t], (text, tok.decode([t]))
            assert not allowed[vocab.stop_ids].any()
            c.advance(t)
        assert c.allowed()[vocab.stop_ids].all() and c.allowed().sum() == len(vocab.stop_ids)


def test_random_constrained_generation_ends_valid(vocab: JsonVocab) -> None:
    g = torch.Generator().manual_seed(0)
    closers = torch.tensor(
        [any(ch in '}]"' for ch in t) for t in vocab.texts] + [False] * (vocab.size - len(vocab.texts))
    )
    ended = 0
    for _ in range(20):
        c, text = JsonConstraint(vocab), ""
        for _ in range(300):
            logits = torch.randn(vocab.size, generator=g) + 4.0 * closers  # favour closing, so it ends
            t = int(logits.masked_fill(~c.allowed(), float("-inf")).argmax())
            if t in vocab.stop_ids:
                assert isinstance(json.loads(text), dict)
                ended += 1
                break
            text += vocab.texts[t]
            c.advance(t)
    assert ended >= 10
