"""The embedded default model (SmolLM2-135M-Instruct) against transformers on the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from graftlm.engine.generate import Generator
from graftlm.engine.sampling import SamplingParams
from graftlm.loading import catalog
from tests.conftest import hf_greedy

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "List three colours.",
]


@pytest.fixture(scope="module")
def real():  # type: ignore[no-untyped-def]
    model, tok, source = catalog.load(catalog.DEFAULT_MODEL)
    ref = LlamaForCausalLM.from_pretrained(source.checkpoint, dtype=torch.float32).eval()
    return model, tok, source, ref


def test_logits_equal_transformers(real) -> None:  # type: ignore[no-untyped-def]
    model, tok, _, ref = real
    for q in QUESTIONS:
        ids = torch.tensor([tok.encode_chat([{"role": "user", "content": q}])])
        with torch.no_grad():
            diff = (ref(ids).logits - model(ids)).abs().max()
        assert float(diff) <= 1e-4, q


def test_greedy_tokens_equal_transformers(real) -> None:  # type: ignore[no-untyped-def]
    model, tok, _, ref = real
    gen = Generator(model, tok)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    ours = gen.generate(prompts, SamplingParams(max_new_tokens=32, ignore_eos=True))
    for p, o in zip(prompts, ours, strict=True):
        assert o.token_ids == hf_greedy(ref, p, 32)


def test_gguf_weights_equal_transformers_gguf_loader(real) -> None:  # type: ignore[no-untyped-def]
    model, _, source, _ = real
    ref = LlamaForCausalLM.from_pretrained(source.origin.parent, gguf_file=source.origin.name, dtype=torch.float32)
    ours = model.state_dict()
    for key, t in ref.state_dict().items():
        assert torch.equal(ours[key.removeprefix("model.")], t), key


def test_chat_template_equals_apply_chat_template(real) -> None:  # type: ignore[no-untyped-def]
    _, tok, source, _ = real
    ref = AutoTokenizer.from_pretrained(source.origin.parent, gguf_file=source.origin.name)
    conversations = [
        [{"role": "user", "content": "Hi!"}],
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
    ]
    for msgs in conversations:
        for gen_prompt in (True, False):
            want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
            assert tok.render_chat(msgs, gen_prompt) == want
            want_ids = ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen_prompt, return_dict=False)
            assert tok.encode_chat(msgs, gen_prompt) == list(want_ids)
