"""Tiny random Llama models and a tiny byte-level BPE tokenizer, written as real checkpoint directories."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Summarize this email in one line, please.",
    "Meeting on Tuesday at 3pm in room 12 with Alice and Bob.",
    "Proofread: teh cat sat on the mat and it was happy.",
    "Numbers like 12345 and 2024-11-23 appear in text too!",
] * 20

TINY = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    )
    return tok


def write_tiny_checkpoint(path: Path, seed: int = 0, **overrides: object) -> Path:
    """A random `transformers` LlamaForCausalLM saved with a tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = {**TINY, "vocab_size": tok.get_vocab_size(), **overrides}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    # Random init with std 0.02 gives near-uniform logits; widen it so greedy choices are not ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "chat_template": CHATML,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


def hf_greedy(ref: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `prompt`, `n` tokens, through EOS (as `ignore_eos` does)."""
    ref.generation_config.eos_token_id = None
    out = ref.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Converted GGUFs go to a per-session cache, except the real model's, which is slow to convert.
    monkeypatch.setenv("GRAFTLM_CACHE", str(tmp_path_factory.getbasetemp() / "graftlm-cache"))


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # `graftlm.cli.main` installs a log handler bound to the test's captured stderr; drop it afterwards,
    # or later tests (and their server threads) log into a closed stream.
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    root.handlers[:] = before
    root.setLevel(level)
