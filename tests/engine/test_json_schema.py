"""JSON-schema mode: the grammar accepts exactly the canonical documents of the schema, and constrained
generation gives documents that `jsonschema` (the reference validator) accepts."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from graftlm.engine.json_mode import JsonConstraint, JsonVocab
from graftlm.engine.json_schema import SchemaError, compile_schema
from graftlm.loading.checkpoint import load_checkpoint

SCHEMA = {
    "type": "object",
    "properties": {
        "grade": {"type": "string", "enum": ["good", "neutral", "poor"]},
        "count": {"type": "integer"},
        "ok": {"type": "boolean"},
        "reason": {"type": "string", "maxLength": 12},
    },
    "required": ["grade", "count", "ok", "reason"],
    "additionalProperties": False,
}


def canonical(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


def accepts(schema: dict, text: str) -> bool:
    g = compile_schema(schema)
    s = g.start
    for ch in text:
        s = g.step(s, ch)
        if s is None:
            return False
    return g.done(s)


@pytest.mark.parametrize(
    "obj",
    [
        {"grade": "good", "count": 0, "ok": True, "reason": ""},
        {"grade": "poor", "count": -42, "ok": False, "reason": "too short é!"},
        {"grade": "neutral", "count": 123456789012, "ok": True, "reason": "x" * 12},
    ],
)
def test_canonical_documents_of_the_schema_are_accepted(obj: dict) -> None:
    jsonschema.validate(obj, SCHEMA)
    assert accepts(SCHEMA, canonical(obj))


@pytest.mark.parametrize(
    "text",
    [
        '{"grade": "great", "count": 1, "ok": true, "reason": "r"}',  # not in the enum
        '{"count": 1, "grade": "good", "ok": true, "reason": "r"}',  # another order
        '{"grade": "good", "count": 01, "ok": true, "reason": "r"}',
        '{"grade": "good", "count": 1.5, "ok": true, "reason": "r"}',
        '{"grade": "good", "count": 1, "ok": "true", "reason": "r"}',
        '{"grade": "good", "count": 1, "ok": true, "reason": "thirteen char"}',  # over maxLength
        '{"grade": "good", "count": 1, "ok": true, "reason": "a\\"b"}',  # no escapes
        '{"grade": "good", "count": 1, "ok": true}',
        '{"grade": "good", "count": 1, "ok": true, "reason": "r"} ',
    ],
)
def test_anything_else_is_refused(text: str) -> None:
    assert not accepts(SCHEMA, text)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "array"}, "must be an object whose properties"),
        ({"type": "object", "properties": {}}, "no properties"),
        ({"type": "object", "properties": {"x": {"type": "number"}}}, "type 'number' is not supported"),
        ({"type": "object", "properties": {"x": {"type": "object", "properties": {}}}}, "type 'object'"),
        ({"type": "object", "properties": {"x": {"enum": [1, 2]}}}, "enum must list strings or booleans"),
    ],
)
def test_unsupported_schemas_are_refused(schema: dict, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        compile_schema(schema)


def test_random_constrained_generation_gives_valid_documents(tiny_dir: Path) -> None:
    model, tok = load_checkpoint(tiny_dir)
    vocab = JsonVocab(tok, model.config.vocab_size, tok.stop_ids(model.config.eos_token_id))
    grammar = compile_schema(SCHEMA)
    g = torch.Generator().manual_seed(0)
    quotes = torch.tensor(['"' in t for t in vocab.texts] + [False] * (vocab.size - len(vocab.texts)))
    for _ in range(20):
        c, text = JsonConstraint(vocab, grammar), ""
        for _ in range(200):
            logits = torch.randn(vocab.size, generator=g) + 2.0 * quotes
            t = int(logits.masked_fill(~c.allowed(), float("-inf")).argmax())
            if t in vocab.stop_ids:
                break
            text += vocab.texts[t]
            c.advance(t)
        else:
            pytest.fail(f"no end after 200 tokens: {text!r}")
        jsonschema.validate(json.loads(text), SCHEMA)
