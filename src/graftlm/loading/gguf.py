"""Read a GGUF file (llama.cpp's format): config and tokenizer from its metadata, weights dequantized.

Dequantization is the `gguf` package's (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, K-quants, ...).
llama.cpp's converter reorders the rows of the Q and K projections for its rotary layout; we undo it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, dequantize
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from graftlm.errors import CorruptModelError, UnsupportedModelError
from graftlm.model.config import LlamaConfig
from graftlm.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# How each `tokenizer.ggml.pre` splits text before byte-level BPE (llama.cpp's llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3")


@dataclass
class GGUFModel:
    config: dict[str, Any]  # HF config.json layout
    tensors: dict[str, torch.Tensor]  # HF key names, float32
    tokenizer: Tokenizer


def open_gguf(path: Path) -> GGUFReader:
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on bad files
        raise CorruptModelError(f"{path} is not a valid GGUF file (truncated or corrupt?): {e}") from e


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_config(reader: GGUFReader, path: Path) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError(f"{path}: per-dimension rope frequency factors (rope_freqs) are not supported")

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise CorruptModelError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    n_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else None)
    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab or 0),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // n_heads)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {
            "rope_type": scaling,
            "factor": float(_field(reader, f"{arch}.rope.scaling.factor", 1.0)),
        }
    return config


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows: interleaved rotary pairs back to HF's half-split layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")  # blk.{i}.{kind}.{weight|bias}
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def read_tensors(reader: GGUFReader, config: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf = _hf_name(t.name)
        if hf is None:
            raise UnsupportedModelError(f"{path}: unexpected GGUF tensor {t.name!r}")
        qtype = GGMLQuantizationType(t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            w = np.asarray(dequantize(t.data, qtype), dtype=np.float32).reshape(shape)
        except NotImplementedError as e:
            raise UnsupportedModelError(f"{path}: GGUF tensor type {qtype.name} is not supported") from e
        except ValueError as e:
            raise CorruptModelError(f"{path}: tensor {t.name} ({qtype.name}) is corrupt: {e}") from e
        if ".q_proj." in hf:
            w = unpermute_rotary(w, config["num_attention_heads"])
        elif ".k_proj." in hf:
            w = unpermute_rotary(w, config["num_key_value_heads"])
        out[hf] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # own copy, off the mmap
    return out


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre not in (None, "default", "gpt2"):
        log.warning("GGUF pre-tokenizer %r is not known; splitting text as GPT-2 does", pre)
    return byte_level


def read_tokenizer(reader: GGUFReader, path: Path) -> Tokenizer:
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
            "load the Hugging Face checkpoint directory instead"
        )
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    merges: list[str] = _field(reader, "tokenizer.ggml.merges") or []
    types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFTokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    special = [
        AddedToken(tok, special=True, normalized=False)
        for tok, ty in zip(tokens, types, strict=True)
        if ty == TOKEN_TYPE_CONTROL
    ]
    backend.add_special_tokens(special)
    user = [
        AddedToken(tok, normalized=False)
        for tok, ty in zip(tokens, types, strict=True)
        if ty == TOKEN_TYPE_USER_DEFINED
    ]
    backend.add_tokens(user)

    def token_text(key: str) -> str | None:
        tid = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[tid] if tid is not None and 0 <= tid < len(tokens) else None

    return Tokenizer(
        backend=backend,
        bos_token=token_text("bos_token_id"),
        eos_token=token_text("eos_token_id"),
        add_bos=False,  # byte-level BPE vocabularies leave BOS to the chat template, as transformers does
        chat_template=_field(reader, "tokenizer.chat_template"),
    )


def read_gguf(path: Path) -> GGUFModel:
    reader = open_gguf(path)
    config = read_config(reader, path)
    LlamaConfig.from_hf_dict(config)  # validate before the slow part
    tokenizer = read_tokenizer(reader, path)
    return GGUFModel(config=config, tensors=read_tensors(reader, config, path), tokenizer=tokenizer)
