"""Verifiable-instruction checks (in the spirit of IFEval): rules a program can check on an answer.

A test line lists its checks under `checks`, each an object naming the check and its settings:

    {"messages": [...], "checks": [{"check": "words", "max": 50},
                                   {"check": "keywords", "words": ["budget", "deadline"]},
                                   {"check": "json", "schema": {"type": "object", "required": ["name"]}}]}

| check | settings | passes when the answer |
|---|---|---|
| words | min, max | has that many words |
| sentences | min, max | has that many sentences |
| keywords | words | contains every word or phrase (any case) |
| forbidden | words | contains none of them |
| json | schema (optional) | is one JSON value (a code fence around it is allowed), valid against the JSON Schema |
| case | case: lower, upper | is all lower or all upper case |
| bullets | min, max | has that many lines starting with `-`, `*` or `•` |
| starts_with, ends_with | text | starts or ends with the text (any case, surrounding space ignored) |
| language | language (ISO 639-1, e.g. "fr") | is written in that language (langdetect) |

JSON Schema validation is the `jsonschema` library's and language identification `langdetect`'s (the
library IFEval uses); the counting rules are written here, in a few lines each.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from graftlm.errors import ConfigError
from graftlm.eval.grade import Case, Grade, mean_score, rate

WORD = re.compile(r"\w+(?:['’-]\w+)*")
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
BULLET = re.compile(r"^\s*[-*•]\s+\S", re.MULTILINE)
FENCE = re.compile(r"^```[a-zA-Z]*\n(.*)\n```$", re.DOTALL)


class CheckError(ConfigError):
    """A check in a test line that is unknown or set up wrongly."""


def count_words(text: str) -> int:
    return len(WORD.findall(text))


def count_sentences(text: str) -> int:
    """Sentences end with . ! or ? before a space or the end; trailing text without one is a sentence too."""
    text = text.strip()
    if not text:
        return 0
    ends = list(SENTENCE_END.finditer(text))
    tail = text[ends[-1].end() :].strip() if ends else text
    return len(ends) + (1 if tail else 0)


def _bounds(n: int, spec: dict[str, Any], what: str) -> tuple[bool, str]:
    lo, hi = spec.get("min"), spec.get("max")
    ok = (lo is None or n >= lo) and (hi is None or n <= hi)
    if lo is not None and lo == hi:
        want = f"exactly {lo}"
    else:
        want = " and ".join(
            s for s in (f"at least {lo}" if lo is not None else "", f"at most {hi}" if hi is not None else "") if s
        )
    return ok, f"{n} {what} ({'wanted ' + want})"


def _contains(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text.lower()) is not None


def _words(out: str, spec: dict[str, Any]) -> tuple[bool, str]:
    return _bounds(count_words(out), spec, "words")


def _sentences(out: str, spec: dict[str, Any]) -> tuple[bool, str]:
    return _bounds(count_sentences(out), spec, "sentences")


def _bullets(out: str, spec: dict[str, Any]) -> tuple[bool, str]:
    return _bounds(len(BULLET.findall(out)), spec, "bullet lines")


def _keywords(out: str, spec: dict[str, Any]) -> tuple[bool, str]:
    missing = [w for w in spec["words"] if not _contains(out, w)]
    return not missing, f"missing {', '.join(map(repr, missing))}" if missing else "has every keyword"


def _forbidden(out: str, spec: dict[str, Any]) -> tuple[bool, str]:
    found = [w for w in spec["words"] if _contains(out, w)]
    return not found, f"uses {', '.join(map(repr, found))}" if found else "uses no forbidden word"


def _json(out: str, spec: dict[str, Any]) -> tuple[bool, str]:
    text = out.strip()
    if m := FENCE.match(text):
        text = m.group(1).strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return False, f"not JSON: {e}"
    if "schema" in spec:
        import jsonschema

        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(spec["schema"]).iter_errors(value))
        if error is not None:
            return False, f"JSON against the schema: {error.message}"
    return True, "valid JSON" + (" matching the schema" if "schema" in spec else "")


def _case(out: str, spec: dict[str, Any]) -> tuple[bool, str]:
    want = spec["case"]
    ok = out == out.lower() if want == "lower" else out == out.upper()
    return ok, f"{'all' if ok else 'not all'} {want} case"


def _starts_with(out: str, spec: dict[str, Any]) -> tuple[bool, str]:
    ok = out.strip().lower().startswith(spec["text"].strip().lower())
    return ok, f"{'starts' if ok else 'does not start'} with {spec['text']!r}"


def _ends_with(out: str, spec: dict[str, Any]) -> tuple[bool, str]:
    ok = out.strip().lower().endswith(spec["text"].strip().lower())
    return ok, f"{'ends' if ok else 'does not end'} with {spec['text']!r}"


def _language(out: str, spec: dict[str, Any]) -> tuple[bool, str]:
    from langdetect import DetectorFactory, detect_langs
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0  # langdetect samples; a fixed seed makes it repeatable
    try:
        found = detect_langs(out)[0]
    except LangDetectException:
        return False, "no language detected (no letters)"
    ok = found.lang == spec["language"]
    return ok, f"written in {found.lang} (p={found.prob:.2f}; wanted {spec['language']})"


@dataclass(frozen=True)
class CheckKind:
    run: Callable[[str, dict[str, Any]], tuple[bool, str]]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


KINDS: dict[str, CheckKind] = {
    "words": CheckKind(_words, optional=("min", "max")),
    "sentences": CheckKind(_sentences, optional=("min", "max")),
    "bullets": CheckKind(_bullets, optional=("min", "max")),
    "keywords": CheckKind(_keywords, ("words",)),
    "forbidden": CheckKind(_forbidden, ("words",)),
    "json": CheckKind(_json, optional=("schema",)),
    "case": CheckKind(_case, ("case",)),
    "starts_with": CheckKind(_starts_with, ("text",)),
    "ends_with": CheckKind(_ends_with, ("text",)),
    "language": CheckKind(_language, ("language",)),
}


def validate(spec: Any, where: str) -> dict[str, Any]:
    """A check's settings, checked before any model runs; CheckError names `where` and what is wrong."""
    if not isinstance(spec, dict) or spec.get("check") not in KINDS:
        name = spec.get("check") if isinstance(spec, dict) else spec
        raise CheckError(f"{where}: unknown check {name!r}; choose from {', '.join(KINDS)}")
    kind = KINDS[spec["check"]]
    unknown = set(spec) - {"check", *kind.required, *kind.optional}
    missing = [k for k in kind.required if k not in spec]
    if unknown or missing:
        raise CheckError(
            f"{where}: check {spec['check']!r} "
            + (f"has unknown settings {sorted(unknown)}" if unknown else f"needs {', '.join(missing)}")
        )
    for k in ("min", "max"):
        if k in spec and (not isinstance(spec[k], int) or isinstance(spec[k], bool) or spec[k] < 0):
            raise CheckError(f"{where}: check {spec['check']!r}: {k} must be a whole number >= 0")
    if "words" in spec and (not isinstance(spec["words"], list) or not all(isinstance(w, str) for w in spec["words"])):
        raise CheckError(f"{where}: check {spec['check']!r}: words must be a list of strings")
    if spec["check"] == "case" and spec["case"] not in ("lower", "upper"):
        raise CheckError(f"{where}: check 'case': case is lower or upper")
    if spec["check"] == "json" and "schema" in spec:
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(spec["schema"])
        except jsonschema.SchemaError as e:
            raise CheckError(f"{where}: check 'json': the schema is not a valid JSON Schema: {e.message}") from e
    return spec


def run_checks(output: str, checks: Sequence[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """(check name, passed, why) for each check."""
    return [(c["check"], *KINDS[c["check"]].run(output, c)) for c in checks]


@dataclass(frozen=True)
class InstructionGrader:
    """Every check a test line lists: the score is 1 when all pass (IFEval's strict prompt-level
    accuracy); `instruction_rate` counts checks one by one (its instruction-level accuracy)."""

    name: str = "instructions"

    def grade(self, cases: Sequence[Case], outputs: Sequence[str]) -> list[Grade]:
        grades = []
        for i, (case, out) in enumerate(zip(cases, outputs, strict=True)):
            checks = case.fields.get("checks")
            if not checks:
                grades.append(Grade.failure("this example lists no checks"))
                continue
            results = run_checks(out, [validate(c, f"example {i + 1}") for c in checks])
            passed = sum(ok for _, ok, _ in results)
            grades.append(
                Grade(
                    float(passed == len(results)),
                    "pass" if passed == len(results) else "fail",
                    [f"{name}: {'ok' if ok else 'FAILED'}: {why}" for name, ok, why in results],
                    {f"{j + 1}. {name}": "pass" if ok else "fail" for j, (name, ok, _) in enumerate(results)},
                )
            )
        return grades

    def figures(self, grades: Sequence[Grade]) -> dict[str, float]:
        checked = [g for g in grades if not g.failed]
        total = sum(len(g.dimensions) for g in checked)
        ok = sum(v == "pass" for g in checked for v in g.dimensions.values())
        return {
            **rate(sum(g.label == "pass" for g in grades), len(grades), "pass_rate"),
            "instruction_rate": ok / total if total else 0.0,
            "score": mean_score(grades),
        }
