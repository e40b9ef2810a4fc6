"""Tokenizer and chat template: a `tokenizers.Tokenizer` plus special ids and a Jinja chat template."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from graftlm.errors import CorruptModelError, GraftlmError

# Tokens that end a turn in common chat formats (llama.cpp's end-of-generation list).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

Message = dict[str, Any]


def _raise(message: str) -> None:
    raise GraftlmError(f"chat template error: {message}")


def _template_env() -> jinja2.Environment:
    # The same environment transformers' apply_chat_template uses, so the rendered text matches.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos: bool = False
    chat_template: str | None = None
    _compiled: jinja2.Template | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        """What pads a batch's short rows: the end-of-text token, or 0 without one (padded positions are
        masked out, so any id does)."""
        eos = self.eos_id
        return 0 if eos is None else eos

    def stop_ids(self, config_eos: Sequence[int] = ()) -> set[int]:
        """Ids that end generation: the model's EOS ids plus known end-of-turn tokens in the vocab."""
        ids = set(config_eos)
        for tok in (self.eos_token, *END_OF_TURN_TOKENS):
            tid = self.token_id(tok)
            if tid is not None:
                ids.add(tid)
        return ids

    def encode(self, text: str, add_special: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos if add_special is None else add_special
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages`, as text (what `apply_chat_template` renders)."""
        if not self.chat_template:
            raise GraftlmError("this model has no chat template; use plain text generation instead")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise GraftlmError(f"message {i} must be an object with 'role' and 'content', got {m!r}")
        if self._compiled is None:
            self._compiled = _template_env().from_string(self.chat_template)
        return self._compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special=False)

    # -- files --------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        """Read `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` from a checkpoint."""
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise CorruptModelError(f"{path} has no tokenizer.json")
        try:
            backend = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CorruptModelError(f"cannot read {tok_file}: {e}") from e
        cfg: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.exists():
            try:
                cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise CorruptModelError(f"cannot read {cfg_file}: {e}") from e
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = path / "chat_template.jinja"
        if jinja_file.exists():
            template = jinja_file.read_text()
        return cls(
            backend=backend,
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=_token_text(cfg.get("eos_token")),
            add_bos=bool(cfg.get("add_bos_token", False)),
            chat_template=template,
        )

    def save(self, path: Path) -> None:
        self.backend.save(str(path / "tokenizer.json"))
        cfg = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def _token_text(tok: Any) -> str | None:
    # tokenizer_config.json spells special tokens as strings or as AddedToken dicts.
    if isinstance(tok, dict):
        return tok.get("content")
    return tok
