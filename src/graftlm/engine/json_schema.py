"""JSON-schema mode (`response_format: {"type": "json_schema", ...}`, OpenAI's structured outputs) for the
schemas judges and extractors use: one object whose properties are strings (optionally with `maxLength`),
string enums, booleans or integers.

The output is the object in one canonical layout, properties in the schema's order, every property
present: `{"grade": "good", "reason": "..."}`. Its grammar is a list of parts (fixed text, a choice
among fixed texts, a free string, an integer) walked one character at a time, which is all
`graftlm.engine.json_mode.JsonVocab` needs to mask tokens. Free strings take no escapes (no `\\`), so
what the model writes between the quotes is the value as it reads.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from graftlm.errors import ConfigError

INT_DIGITS = 12  # integers up to 12 digits (the schemas this serves count things)
SUPPORTED = "an object whose properties are strings (maxLength allowed), string enums, booleans or integers"


@dataclass(frozen=True)
class Lit:
    text: str


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]  # each a complete JSON text, e.g. '"good"' or 'true'


@dataclass(frozen=True)
class Text:
    max_len: int  # characters before the closing quote (its opening quote is the Lit before)


@dataclass(frozen=True)
class Int:
    pass


Part = Lit | Choice | Text | Int
# a state: (index of the part, what is typed of it: characters for Lit and Text, the text for Choice and Int)
State = tuple[int, Any]


class SchemaError(ConfigError):
    """A JSON schema this mode does not support."""


def _value(name: str, spec: Any) -> list[Part]:
    if not isinstance(spec, dict):
        raise SchemaError(f"property {name!r}: its schema must be an object")
    if "enum" in spec:
        values = spec["enum"]
        if not isinstance(values, list) or not values or not all(isinstance(v, str | bool) for v in values):
            raise SchemaError(f"property {name!r}: enum must list strings or booleans")
        options = tuple(dict.fromkeys(json.dumps(v, ensure_ascii=False) for v in values))
        return [Choice(options)]
    kind = spec.get("type")
    if kind == "string":
        max_len = spec.get("maxLength", 1 << 30)
        if not isinstance(max_len, int) or max_len < 0:
            raise SchemaError(f"property {name!r}: maxLength must be a whole number")
        return [Lit('"'), Text(max_len)]
    if kind == "boolean":
        return [Choice(("true", "false"))]
    if kind == "integer":
        return [Int()]
    raise SchemaError(f"property {name!r}: type {kind!r} is not supported; this server supports {SUPPORTED}")


def compile_schema(schema: Any) -> SchemaGrammar:
    """The grammar of `schema`; SchemaError says what in it is not supported."""
    if not isinstance(schema, dict) or schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        raise SchemaError(f"the schema must be {SUPPORTED}")
    props = schema["properties"]
    if not props:
        raise SchemaError("the schema's object has no properties")
    parts: list[Part] = []
    for i, (name, spec) in enumerate(props.items()):
        parts.append(Lit(("{" if i == 0 else ", ") + json.dumps(name, ensure_ascii=False) + ": "))
        parts += _value(name, spec)
    parts.append(Lit("}"))
    merged: list[Part] = []
    for p in parts:  # adjacent fixed texts are one
        if isinstance(p, Lit) and merged and isinstance(merged[-1], Lit):
            merged[-1] = Lit(merged[-1].text + p.text)
        else:
            merged.append(p)
    return SchemaGrammar(tuple(merged))


def _plain(ch: str) -> bool:
    return ch not in '"\\' and ord(ch) >= 0x20


@dataclass(frozen=True)
class SchemaGrammar:
    parts: tuple[Part, ...]

    @property
    def start(self) -> State:
        return self._enter(0)

    def _enter(self, i: int) -> State:
        return (i, "" if i < len(self.parts) and isinstance(self.parts[i], Choice | Int) else 0)

    def step(self, state: State, ch: str) -> State | None:
        i, typed = state
        if i >= len(self.parts):
            return None
        part = self.parts[i]
        if isinstance(part, Lit):
            if ch != part.text[typed]:
                return None
            return self._enter(i + 1) if typed + 1 == len(part.text) else (i, typed + 1)
        if isinstance(part, Choice):
            now = typed + ch
            if now in part.options:  # JSON texts: a complete one is no prefix of another
                return self._enter(i + 1)
            return (i, now) if any(o.startswith(now) for o in part.options) else None
        if isinstance(part, Text):
            if ch == '"':
                return self._enter(i + 1)
            return (i, typed + 1) if _plain(ch) and typed < part.max_len else None
        # Int: -?(0|[1-9][0-9]*), then the next part's first character
        now = typed + ch
        body = now.removeprefix("-")
        if ch.isdigit() and ch.isascii() and len(body) <= INT_DIGITS and not (body[:1] == "0" and len(body) > 1):
            return (i, now)
        if typed.removeprefix("-"):
            return self.step(self._enter(i + 1), ch)
        return None if ch != "-" or typed else (i, "-")

    def string_room(self, state: State) -> int | None:
        i, typed = state
        if i < len(self.parts) and isinstance(part := self.parts[i], Text):
            return part.max_len - typed
        return None

    def done(self, state: State) -> bool:
        return state[0] >= len(self.parts)

    def key(self, state: State, longest: int) -> Hashable:
        room = self.string_room(state)
        return state if room is None else (state[0], "room", min(room, longest + 1))
