"""Task metrics, each a function (prediction, reference) -> score in [0, 1], and the grader that uses one."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from graftlm.eval.grade import Case, Grade, mean_score


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


@dataclass(frozen=True)
class MetricGrader:
    """A task metric as a grader: the score is the metric against the case's reference answer."""

    name: str

    def grade(self, cases: Sequence[Case], outputs: Sequence[str]) -> list[Grade]:
        metric = METRICS[self.name]
        grades = []
        for case, out in zip(cases, outputs, strict=True):
            if case.reference is None:
                grades.append(Grade.failure(f"{self.name} needs a reference answer and this example has none"))
                continue
            try:
                score = metric(out, case.reference)
            except (json.JSONDecodeError, TypeError) as e:  # a reference that is not JSON for json_field_f1
                grades.append(Grade.failure(f"{self.name}: the reference cannot be scored: {e}"))
                continue
            grades.append(Grade(score, reasons=[f"{self.name} {score:.3f}"]))
        return grades

    def figures(self, grades: Sequence[Grade]) -> dict[str, float]:
        return {self.name: mean_score(grades)}
