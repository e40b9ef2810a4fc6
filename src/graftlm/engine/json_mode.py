"""JSON mode (`response_format: {"type": "json_object"}`): only tokens that keep the output a prefix of a
valid JSON object may be chosen, and the end-of-sequence token only once the object is closed.

A character-level pushdown recognizer tracks where in the JSON grammar the output is; for each state the
allowed-token mask is computed once (cached): tokens made only of plain string characters are allowed
wholesale inside strings, every other candidate is checked character by character.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from typing import Any, Protocol

import torch

from graftlm.model.tokenizer import Tokenizer

# modes: what the recognizer expects next
OBJ_START = "obj_start"  # the top-level '{'
KEY_OR_END = "key_or_end"  # after '{': a key or '}'
KEY = "key"  # after ',' in an object
COLON = "colon"
VALUE = "value"
VALUE_OR_END = "value_or_end"  # after '[': a value or ']'
AFTER = "after"  # after a value inside a container: ',' or the closer
STRING = "string"
ESCAPE = "escape"
UNICODE = "unicode"  # aux: hex digits still expected
NUMBER = "number"  # aux: the number's sub-state
LITERAL = "literal"  # aux: the rest of true/false/null
DONE = "done"

WS = " \t\n\r"
HEX = "0123456789abcdefABCDEF"
LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
# number sub-states: which characters may follow
NUM_NEXT = {
    "sign": {"0": "zero", **dict.fromkeys("123456789", "int")},
    "zero": {".": "dot", "e": "exp", "E": "exp"},
    "int": {**dict.fromkeys("0123456789", "int"), ".": "dot", "e": "exp", "E": "exp"},
    "dot": dict.fromkeys("0123456789", "frac"),
    "frac": {**dict.fromkeys("0123456789", "frac"), "e": "exp", "E": "exp"},
    "exp": {"+": "exp_sign", "-": "exp_sign", **dict.fromkeys("0123456789", "exp_int")},
    "exp_sign": dict.fromkeys("0123456789", "exp_int"),
    "exp_int": dict.fromkeys("0123456789", "exp_int"),
}
NUM_COMPLETE = {"zero", "int", "frac", "exp_int"}

State = tuple[tuple[str, ...], str, object]  # (open containers, mode, aux)
START: State = ((), OBJ_START, None)


def _after_value(stack: tuple[str, ...]) -> State:
    return (stack, AFTER if stack else DONE, None)


def _start_value(stack: tuple[str, ...], ch: str) -> State | None:
    if ch == "{":
        return ((*stack, "{"), KEY_OR_END, None)
    if ch == "[":
        return ((*stack, "["), VALUE_OR_END, None)
    if ch == '"':
        return (stack, STRING, False)  # aux: is this string a key?
    if ch == "-":
        return (stack, NUMBER, "sign")
    if ch in "0123456789":
        return (stack, NUMBER, "zero" if ch == "0" else "int")
    if ch in LITERALS:
        return (stack, LITERAL, LITERALS[ch])
    return None


def step(state: State, ch: str) -> State | None:
    """The state after `ch`, or None if `ch` cannot continue valid JSON here."""
    stack, mode, aux = state
    if mode == STRING:
        if ch == '"':
            return (stack, COLON, None) if aux else _after_value(stack)
        if ch == "\\":
            return (stack, ESCAPE, aux)
        return None if ord(ch) < 0x20 else state
    if mode == ESCAPE:
        if ch == "u":
            return (stack, UNICODE, (aux, 4))
        return (stack, STRING, aux) if ch in '"\\/bfnrt' else None
    if mode == UNICODE:
        is_key, left = aux  # type: ignore[misc]
        if ch not in HEX:
            return None
        return (stack, STRING, is_key) if left == 1 else (stack, UNICODE, (is_key, left - 1))
    if mode == NUMBER:
        nxt = NUM_NEXT[aux].get(ch)  # type: ignore[index]
        if nxt is not None:
            return (stack, NUMBER, nxt)
        if aux not in NUM_COMPLETE:
            return None
        return step(_after_value(stack), ch)  # the number ended; this character follows it
    if mode == LITERAL:
        rest: str = aux  # type: ignore[assignment]
        if ch != rest[0]:
            return None
        return _after_value(stack) if len(rest) == 1 else (stack, LITERAL, rest[1:])
    if mode == DONE:
        return None  # nothing after the object (so generation ends)
    if ch in WS:
        return state
    if mode == OBJ_START:
        return ((("{",)), KEY_OR_END, None) if ch == "{" else None
    if mode in (KEY_OR_END, KEY):
        if ch == '"':
            return (stack, STRING, True)
        if ch == "}" and mode == KEY_OR_END:
            return _after_value(stack[:-1])
        return None
    if mode == COLON:
        return (stack, VALUE, None) if ch == ":" else None
    if mode == VALUE_OR_END and ch == "]":
        return _after_value(stack[:-1])
    if mode in (VALUE, VALUE_OR_END):
        return _start_value(stack, ch)
    if mode == AFTER:
        top = stack[-1]
        if ch == ",":
            return (stack, KEY, None) if top == "{" else (stack, VALUE, None)
        if (ch == "}" and top == "{") or (ch == "]" and top == "["):
            return _after_value(stack[:-1])
    return None


def _plain(text: str) -> bool:
    return all(c not in '"\\' and ord(c) >= 0x20 for c in text)


class Grammar(Protocol):
    """What a constraint follows: states advanced one character at a time (this module's JSON object, or
    `graftlm.engine.json_schema`'s schema). Grammars and their states are hashable: masks are cached."""

    start: Hashable

    def step(self, state: Any, ch: str) -> Any | None:
        """The state after `ch`, or None if `ch` is not allowed there."""
        ...

    def string_room(self, state: Any) -> int | None:
        """Inside a free JSON string: how many more plain characters may follow (else None)."""
        ...

    def done(self, state: Any) -> bool:
        """The output is complete: only the end of the sequence may follow."""
        ...

    def key(self, state: Any, longest: int) -> Hashable:
        """What the allowed tokens depend on (`longest`: the longest token text), for the mask cache."""
        ...


class JsonObject:
    """Any JSON object (`response_format: {"type": "json_object"}`)."""

    start: State = START

    def step(self, state: State, ch: str) -> State | None:
        return step(state, ch)

    def string_room(self, state: State) -> int | None:
        return UNBOUNDED if state[1] == STRING else None

    def done(self, state: State) -> bool:
        return state[1] == DONE

    def key(self, state: State, longest: int) -> Hashable:
        return state


UNBOUNDED = 1 << 30
JSON_OBJECT = JsonObject()


class JsonVocab:
    """Per-tokenizer tables, built once: each token's text, and which are plain string characters."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: set[int]):
        n = min(vocab_size, tokenizer.vocab_size)
        self.size = vocab_size
        self.texts = [tokenizer.decode([i]) for i in range(n)]
        usable = [bool(t) and "\ufffd" not in t for t in self.texts]
        self.plain = torch.zeros(vocab_size, dtype=torch.bool)
        self.plain[:n] = torch.tensor([u and _plain(t) for u, t in zip(usable, self.texts, strict=True)])
        self.plain_len = torch.full((vocab_size,), UNBOUNDED, dtype=torch.int64)  # [V] characters of plain tokens
        self.plain_len[:n] = torch.tensor([len(t) for t in self.texts])
        self.longest = max((len(t) for t in self.texts), default=0)
        self.others = [i for i in range(n) if usable[i] and not self.plain[i]]  # hold '"', '\\' or controls
        self.by_first: dict[str, list[int]] = {}
        for i in range(n):
            if usable[i]:
                self.by_first.setdefault(self.texts[i][0], []).append(i)
        self.stop_ids = sorted(s for s in stop_ids if s < vocab_size)
        self._masks: dict[tuple[Hashable, Hashable], torch.Tensor] = {}
        self._lock = threading.Lock()

    def mask(self, state: Any, grammar: Grammar = JSON_OBJECT) -> torch.Tensor:
        """Allowed next tokens [V] bool for `state` (cached per grammar and state)."""
        key = (grammar, grammar.key(state, self.longest))
        m = self._masks.get(key)
        if m is None:
            m = self._build(state, grammar)
            with self._lock:
                if len(self._masks) >= 8192:
                    self._masks.clear()  # many schemas over a long life: start again rather than grow
                self._masks[key] = m
        return m

    def _build(self, state: Any, grammar: Grammar) -> torch.Tensor:
        m = torch.zeros(self.size, dtype=torch.bool)
        if grammar.done(state):
            m[self.stop_ids] = True
            return m
        room = grammar.string_room(state)
        if room is not None:
            m |= self.plain & (self.plain_len <= room)
            candidates: Sequence[int] = self.others
        else:
            candidates = [i for ch, ids in self.by_first.items() if grammar.step(state, ch) is not None for i in ids]
        ok = [i for i in candidates if self.advance(state, i, grammar) is not None]
        if ok:
            m[ok] = True
        if not m.any():  # cannot happen for valid states; never leave a row without a choice
            m[self.stop_ids] = True
        return m

    def advance(self, state: Any, token: int, grammar: Grammar = JSON_OBJECT) -> Any | None:
        s = state
        for ch in self.texts[token] if token < len(self.texts) else "\ufffd":
            s = grammar.step(s, ch)
            if s is None:
                return None
        return s


class JsonConstraint:
    """One sequence's position in its grammar."""

    def __init__(self, vocab: JsonVocab, grammar: Grammar = JSON_OBJECT):
        self.vocab, self.grammar = vocab, grammar
        self.state: Any = grammar.start

    def allowed(self) -> torch.Tensor:
        return self.vocab.mask(self.state, self.grammar)

    def advance(self, token: int) -> None:
        if token in self.vocab.stop_ids:
            return
        nxt = self.vocab.advance(self.state, token, self.grammar)
        if nxt is not None:
            self.state = nxt
