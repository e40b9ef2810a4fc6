"""Top-k / top-p filtering against transformers' logits processors, and the text stream."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from graftlm.engine.sampling import SamplingParams, filter_logits
from graftlm.engine.text_stream import TextStream
from graftlm.model.tokenizer import Tokenizer
from tests.conftest import build_tokenizer


def test_filters_match_transformers_warpers() -> None:
    g = torch.Generator().manual_seed(0)
    for temp, k, p in [(0.7, 0, 0.9), (1.3, 20, 1.0), (1.0, 50, 0.5), (0.5, 5, 0.95), (1.0, 0, 0.3)]:
        logits = torch.randn(1, 1000, generator=g) * 3
        want = TemperatureLogitsWarper(temp)(None, logits.clone())
        if k:
            want = TopKLogitsWarper(k)(None, want)
        if p < 1:
            want = TopPLogitsWarper(p)(None, want)
        got = filter_logits(logits[0], SamplingParams(temperature=temp, top_k=k, top_p=p))
        assert torch.equal(torch.isinf(got), torch.isinf(want[0]))
        kept = ~torch.isinf(got)
        assert torch.allclose(got[kept], want[0][kept])


def test_text_stream_holds_back_partial_stop_strings() -> None:
    tok = Tokenizer(build_tokenizer())
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    stream = TextStream(tok, stop=("lazy",))
    out = "".join(stream.push(t) for t in ids if not stream.stopped)
    assert stream.stopped and out == "The quick brown fox jumps over the "
    plain = TextStream(tok)
    assert "".join(plain.push(t) for t in ids) + plain.finish() == "The quick brown fox jumps over the lazy dog."


def test_text_stream_waits_for_whole_utf8_characters() -> None:
    tok = Tokenizer(build_tokenizer())
    ids = tok.encode("naïve café ☕ done")
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "naïve café ☕ done"
