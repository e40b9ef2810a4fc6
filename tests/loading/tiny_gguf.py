"""Write a tiny Llama GGUF the way llama.cpp's converter does, with a chosen quant type per tensor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quantize
from safetensors.numpy import load_file

# K-quant block layouts: bytes per 256-value block and where the fp16 super-block scales sit.
_K_BLOCK = {Q.Q4_K: (144, (0, 2)), Q.Q6_K: (210, (208,))}
NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype in _K_BLOCK:
        # gguf cannot quantize K-types; write random valid blocks with small scales instead.
        size, scale_offsets = _K_BLOCK[qtype]
        blocks = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // 256, size), dtype=np.uint8)
        for off in scale_offsets:
            blocks[..., off : off + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
        return blocks.reshape(w.shape[0], -1)
    return quantize(w.astype(np.float32), qtype)


def write_gguf(ckpt: Path, out: Path, types: list[Q], pre: str = "default") -> Path:
    """Convert a tiny HF checkpoint to GGUF; linear weights take `types` in turn."""
    cfg = json.loads((ckpt / "config.json").read_text())
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tcfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = GGUFWriter(str(out), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[tcfg["bos_token"]])
    w.add_eos_token_id(vocab[tcfg["eos_token"]])
    w.add_chat_template(tcfg["chat_template"])

    rng = np.random.default_rng(0)
    state = load_file(str(ckpt / "model.safetensors"))
    i = 0
    for key, t in state.items():
        if key == "model.embed_tokens.weight":
            name, qtype = "token_embd.weight", Q.Q8_0
        elif key == "model.norm.weight":
            name, qtype = "output_norm.weight", Q.F32
        elif key == "lm_head.weight":
            name, qtype = "output.weight", Q.F16
        else:
            _, _, layer, *mod, kind = key.split(".")
            name = f"blk.{layer}.{NAMES['.'.join(mod)]}.{kind}"
            qtype = Q.F32 if t.ndim == 1 else types[i % len(types)]
            i += t.ndim > 1
        if name.endswith("attn_q.weight"):
            t = permute(t, cfg["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            t = permute(t, cfg["num_key_value_heads"])
        w.add_tensor(name, encode(t, qtype, rng), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
