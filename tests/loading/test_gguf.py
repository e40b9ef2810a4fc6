"""GGUF loading against transformers' own GGUF loader, and the errors on bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoTokenizer, LlamaForCausalLM

from graftlm.errors import CorruptModelError, UnsupportedModelError
from graftlm.loading import catalog
from graftlm.loading.gguf import read_gguf
from tests.conftest import CHATML, CORPUS, write_tiny_checkpoint
from tests.loading.tiny_gguf import write_gguf

ALL_TYPES = [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]
# K-quants need rows of 256 values.
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("wide"), **WIDE)
    # 14 linear weights over 7 types: q and k projections get F32, Q4_K, Q8_0 and Q6_K among them
    return write_gguf(ckpt, ckpt / "tiny.gguf", ALL_TYPES)


def test_weights_equal_transformers_gguf_loader(tiny_gguf: Path) -> None:
    ours = read_gguf(tiny_gguf).tensors
    ref = LlamaForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    want = ref.state_dict()
    assert set(ours) == {k for k in want if k != "lm_head.weight"} | {"lm_head.weight"} & set(ours)
    for key, t in ours.items():
        assert torch.equal(t, want[key]), key


def test_logits_of_gguf_model_equal_transformers(tiny_gguf: Path) -> None:
    model, _, _ = catalog.load(str(tiny_gguf))
    ref = LlamaForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((ref(tokens).logits - model(tokens)).abs().max()) <= 1e-4


def test_lossless_types_reproduce_the_checkpoint(tmp_path: Path) -> None:
    ckpt = write_tiny_checkpoint(tmp_path, **WIDE)
    path = write_gguf(ckpt, tmp_path / "f32.gguf", [Q.F32])
    ours, _, _ = catalog.load(str(path))
    ref = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    for key, t in ref.state_dict().items():
        k = key.removeprefix("model.")
        if k == "embed_tokens.weight" or k == "lm_head.weight":
            continue  # written as Q8_0
        assert torch.equal(ours.state_dict()[k], t), key  # Q/K rows unpermuted exactly


def test_tokenizer_and_template_equal_transformers(tiny_gguf: Path) -> None:
    _, tok, _ = catalog.load(str(tiny_gguf))
    ref = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    for text in [*CORPUS[:5], "<|im_start|>user\nhi<|im_end|>", "  spaces  and\nnewlines\t"]:
        assert tok.encode(text) == ref(text)["input_ids"], text
    msgs = [{"role": "user", "content": "Summarize: the meeting moved to 3pm."}]
    assert tok.chat_template == CHATML
    want = ref.apply_chat_template(msgs, chat_template=CHATML, tokenize=False, add_generation_prompt=True)
    assert tok.render_chat(msgs) == want


def test_conversion_is_cached(tiny_gguf: Path) -> None:
    first = catalog.resolve(str(tiny_gguf)).checkpoint
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = catalog.resolve(str(tiny_gguf)).checkpoint
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.99])
def test_truncated_gguf_is_refused(tiny_gguf: Path, tmp_path: Path, keep: float) -> None:
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptModelError, match=r"bad\.gguf"):
        catalog.load(str(bad))


def test_garbage_gguf_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(CorruptModelError, match="not a valid GGUF"):
        catalog.load(str(bad))


def test_unsupported_gguf_architecture_is_named(tiny_gguf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "falcon.gguf"
    bad.write_bytes(tiny_gguf.read_bytes().replace(b"llama", b"fal00", 1))
    with pytest.raises(UnsupportedModelError, match="fal00"):
        catalog.load(str(bad))
