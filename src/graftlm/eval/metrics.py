"""Task metrics, each a function (prediction, reference) -> score in [0, 1]."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any


def exact_match(prediction: str, reference: str) -> float:
    """1 when the texts are equal up to surrounding and repeated whitespace."""
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def _rouge_tokens(text: str) -> list[str]:
    # rouge_score's default tokenizer: lowercase, anything but [a-z0-9] separates tokens
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin, 2004): longest common subsequence of words, as rouge_score computes it."""
    p, r = _rouge_tokens(prediction), _rouge_tokens(reference)
    if not p or not r:
        return 0.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in `text` (models often wrap it in prose or code fences)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text[m.start() :])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def json_field_f1(prediction: str, reference: str) -> float:
    """F1 over fields: a predicted field counts when its key exists in the reference with an equal value."""
    ref = json.loads(reference)
    pred = first_json_object(prediction)
    if not pred or not ref:
        return 0.0
    hits = sum(1 for k, v in pred.items() if k in ref and str(v).strip() == str(ref[k]).strip())
    if hits == 0:
        return 0.0
    precision, recall = hits / len(pred), hits / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "rouge_l": rouge_l,
    "json_field_f1": json_field_f1,
}
