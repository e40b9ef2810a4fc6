"""The adapter spec (`adapters.toml`): which adapters exist, their data, settings, evaluation and gate.

```toml
base = "smollm2-135m-instruct"   # catalog name, checkpoint folder or .gguf (paths relative to this file)
registry = "registry"

[defaults.train]                 # for every adapter; an adapter's own [adapter.train] wins
epochs = 2
lr = 1e-3

[defaults.gate]
beat_base_by = 0.05              # score >= base model's score + 0.05

[defaults.eval]                  # graders beside the task metric, and the judge they need
graders = ["rubric"]
judge_url = "http://127.0.0.1:8000/v1"
judge_model = "judge"

[[adapter]]
name = "summarize"
data = "examples/summarize"      # train.jsonl, test.jsonl, optional valid.jsonl and task.json
init_from = "recovery@prod"      # optional parent: a registry reference or an adapter folder
gate = { min_score = 0.2, beat_prod_by = 0.0, require = ["poor_rate <= 0.1", "win_rate_vs_prod >= 0.5"] }

[[template]]                     # one personal adapter per folder matching `data`
name = "reply-{user}"
data = "users/{user}"
metric = "rouge_l"
```

Everything is checked when the spec is read, before any training: missing files, unknown settings
and metrics, gates no score can pass, and `require` rules on figures no configured grader gives.
A `require` rule names any figure of the evaluation (`graftlm eval`'s figures: `good_rate`,
`poor_rate`, `pass_rate`, `violation_rate`, the metric's name, ...); `_vs_prod` or `_vs_base` after a
side-by-side figure (`win_rate`, `preference`, ...) has the judge compare the new version with prod or
the base model.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graftlm.errors import GraftlmError
from graftlm.eval.metrics import METRICS
from graftlm.eval.suite import GRADERS
from graftlm.registry.records import NAME, Ref
from graftlm.train.long import OLD_NAMES, ON_LONG

# Every metric scores in [0, 1] per example, so its mean does too.
SCORE_RANGE = (0.0, 1.0)
TRAIN_KEYS = {
    "rank": int,
    "alpha": float,
    "dropout": float,
    "targets": list,
    "layers": list,
    "rslora": bool,
    "dora": bool,
    "lr": float,
    "epochs": int,
    "batch": int,
    "grad_accum": int,
    "max_length": int,
    "warmup": float,
    "max_steps": int,
    "seed": int,
    "on_long": str,
}
EVAL_KEYS = {
    "limit": int,
    "batch": int,
    "max_new_tokens": int,
    "graders": list,
    "rubric": str,
    "safety_prompts": str,
    "judge_url": str,
    "judge_model": str,
    "judge_format": str,
}
GATE_KEYS = {"min_score": float, "beat_base_by": float, "beat_prod_by": float, "require": list}
RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(<=|>=|<|>)\s*(-?\d+(?:\.\d*)?(?:[eE]-?\d+)?)\s*$")
OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda a, b: a <= b + 1e-9,
    ">=": lambda a, b: a >= b - 1e-9,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
}
# which grader gives a figure (rates' _low/_high bounds included); side-by-side figures end in _vs_prod|_vs_base
FIGURES = {
    "rubric": ("good_rate", "neutral_rate", "poor_rate"),
    "instructions": ("pass_rate", "instruction_rate"),
    "safety": ("violation_rate",),
}
PREFERENCE = ("win_rate", "tie_rate", "loss_rate", "preference", "consistency", "metric_agreement")
COMPARED = ("prod", "base")
ADAPTER_KEYS = {"name", "data", "train_file", "valid_file", "test_file", "metric", "init_from", "train", "eval", "gate"}


class SpecError(GraftlmError):
    """An adapter spec that cannot run as written."""


@dataclass(frozen=True)
class Rule:
    """`figure op value` on a figure of the new version's evaluation, e.g. `poor_rate <= 0.1`."""

    figure: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.figure} {self.op} {self.value:g}"

    @property
    def compared(self) -> str | None:
        """prod or base, for a side-by-side figure; None otherwise."""
        return next((c for c in COMPARED if self.figure.endswith(f"_vs_{c}")), None)

    def check(self, figures: dict[str, float], prod_exists: bool) -> tuple[bool, str]:
        if self.compared == "prod" and not prod_exists:
            return True, f"{self}: no prod version to compare with"
        got = figures.get(self.figure)
        if got is None:
            return False, f"{self}: the evaluation gave no {self.figure}"
        ok = OPS[self.op](got, self.value)
        return ok, f"{self.figure} {got:.4f} {'meets' if ok else 'fails'} {self.op} {self.value:g}"


@dataclass(frozen=True)
class Gate:
    min_score: float | None = None
    beat_base_by: float | None = 0.0  # by default a new adapter must at least match the base model
    beat_prod_by: float | None = 0.0  # and the version it would replace
    require: tuple[Rule, ...] = ()  # rules on any figure of the evaluation

    @property
    def compared(self) -> str | None:
        """The model the new version is compared with side by side (prod or base), if a rule needs one."""
        return next((r.compared for r in self.require if r.compared), None)

    def check_figures(self, figures: dict[str, float], prod_exists: bool) -> tuple[bool, list[str]]:
        results = [r.check(figures, prod_exists) for r in self.require]
        return all(ok for ok, _ in results), [why for _, why in results]

    def check(self, score: float, base: float | None, prod: float | None) -> tuple[bool, list[str]]:
        """Whether `score` passes the score rules, and one line per rule saying why."""
        rules: list[tuple[str, float]] = []
        reasons: list[str] = []
        if self.min_score is not None:
            rules.append(("the floor", self.min_score))
        if self.beat_base_by is not None and base is not None:
            rules.append((f"base {base:.4f} {self.beat_base_by:+.4f}", base + self.beat_base_by))
        if self.beat_prod_by is not None:
            if prod is None:
                reasons.append("no prod version to compare with")
            else:
                rules.append((f"prod {prod:.4f} {self.beat_prod_by:+.4f}", prod + self.beat_prod_by))
        ok = True
        for what, need in rules:
            passed = score >= need - 1e-9
            ok &= passed
            reasons.append(f"{score:.4f} {'>=' if passed else '<'} {need:.4f} ({what})")
        return ok, reasons


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    train_file: Path
    valid_file: Path | None
    test_file: Path
    metric: str
    max_new_tokens: int
    init_from: str | None  # a registry reference (`recovery@prod`) or an adapter folder
    train: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    gate: Gate = Gate()

    @property
    def files(self) -> dict[str, Path]:
        found = {"train": self.train_file, "test": self.test_file}
        if self.valid_file is not None:
            found["valid"] = self.valid_file
        return found

    @property
    def graders(self) -> tuple[str, ...]:
        """Graders beyond the task metric (`eval.graders`)."""
        return tuple(g for g in self.eval.get("graders", ()) if g != self.metric)

    @property
    def full_evaluation(self) -> bool:
        """Whether the new version gets `graftlm eval`'s evaluation (graders, a judge, a gate on figures)."""
        return bool(self.graders or self.eval.get("rubric") or self.gate.require)

    def parent_name(self) -> str | None:
        """The adapter name `init_from` refers to in the registry, if it is a reference and not a path."""
        if self.init_from is None or "/" in self.init_from or Path(self.init_from).suffix:
            return None
        return Ref.parse(self.init_from).name


@dataclass(frozen=True)
class Spec:
    path: Path
    base: str
    registry: Path
    state: Path  # the queue and the run lock
    adapters: tuple[AdapterSpec, ...]

    def adapter(self, name: str) -> AdapterSpec:
        for a in self.adapters:
            if a.name == name:
                return a
        raise SpecError(f"no adapter {name!r} in {self.path}; it lists {', '.join(a.name for a in self.adapters)}")

    def ordered(self) -> list[AdapterSpec]:
        """Adapters with their parents (init_from another adapter in the spec) first."""
        names = {a.name for a in self.adapters}
        done: list[AdapterSpec] = []
        pending = list(self.adapters)
        while pending:
            ready = [a for a in pending if a.parent_name() not in names or a.parent_name() in {d.name for d in done}]
            if not ready:
                raise SpecError(f"init_from forms a cycle among {', '.join(a.name for a in pending)}")
            done += ready
            pending = [a for a in pending if a not in ready]
        return done


def load_spec(path: Path) -> Spec:
    """Read and check an adapter spec; every problem is a SpecError naming the file and entry."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"no spec file {path}")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: {e}") from e
    root = path.parent.resolve()
    unknown = set(doc) - {"base", "registry", "state", "defaults", "adapter", "template"}
    if unknown:
        raise SpecError(f"{path}: unknown top-level keys {', '.join(sorted(unknown))}")
    defaults = doc.get("defaults", {})
    base = str(doc.get("base", "smollm2-135m-instruct"))
    if "/" in base or base.endswith(".gguf"):
        base = str(_existing(root / base, path, "base model"))
    entries = [dict(e) for e in doc.get("adapter", [])]
    for t in doc.get("template", []):
        entries += _expand(t, root, path)
    if not entries:
        raise SpecError(f"{path} lists no [[adapter]] or [[template]] entries")
    adapters = tuple(_adapter(e, defaults, root, path) for e in entries)
    seen: set[str] = set()
    for a in adapters:
        if a.name in seen:
            raise SpecError(f"{path}: adapter {a.name!r} is listed twice")
        seen.add(a.name)
    spec = Spec(path, base, root / doc.get("registry", "registry"), root / doc.get("state", ".graftlm"), adapters)
    spec.ordered()
    return spec


def _expand(t: dict[str, Any], root: Path, path: Path) -> list[dict[str, Any]]:
    name, data = t.get("name", ""), t.get("data", "")
    if "{user}" not in name or "{user}" not in data:
        raise SpecError(f"{path}: a [[template]] needs `name` and `data` that both contain {{user}}")
    prefix, _, suffix = data.partition("{user}")
    folder = root / prefix
    if not folder.is_dir():
        raise SpecError(f"{path}: template {name!r}: {folder} is not a folder")
    out = []
    for d in sorted(folder.iterdir()):
        if d.is_dir() and NAME.match(d.name) and (root / (prefix + d.name + suffix)).is_dir():
            out.append({**t, "name": name.replace("{user}", d.name), "data": prefix + d.name + suffix})
    if not out:
        raise SpecError(f"{path}: template {name!r} matches no folder under {folder}")
    return out


def _adapter(e: dict[str, Any], defaults: dict[str, Any], root: Path, path: Path) -> AdapterSpec:
    name = e.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise SpecError(f"{path}: every adapter needs a `name` of letters, digits, '.', '_', '-' (got {name!r})")
    where = f"{path}: adapter {name!r}"
    unknown = set(e) - ADAPTER_KEYS
    if unknown:
        raise SpecError(
            f"{where}: unknown keys {', '.join(sorted(unknown))} (known: {', '.join(sorted(ADAPTER_KEYS))})"
        )
    data = root / e["data"] if "data" in e else None
    task = _task(data / "task.json", where) if data is not None and (data / "task.json").is_file() else {}

    def file(key: str, default: str | None) -> Path | None:
        if key in e:
            return _existing(root / e[key], path, f"adapter {name!r}: {key}")
        if data is None or default is None:
            return None
        candidate = data / default
        return candidate if candidate.is_file() else None

    train_file, test_file = file("train_file", "train.jsonl"), file("test_file", "test.jsonl")
    valid_file = file("valid_file", "valid.jsonl")
    if train_file is None or test_file is None:
        label = "training data (train.jsonl)" if train_file is None else "test data (test.jsonl)"
        raise SpecError(f"{where}: no {label}; give `data` (a folder holding it) or the file itself")
    metric = e.get("metric") or task.get("metric")
    if metric not in METRICS:
        raise SpecError(f"{where}: unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    train = _settings({**defaults.get("train", {}), **e.get("train", {})}, TRAIN_KEYS, f"{where}: train")
    evals = _settings({**defaults.get("eval", {}), **e.get("eval", {})}, EVAL_KEYS, f"{where}: eval")
    gate = _gate({**defaults.get("gate", {}), **e.get("gate", {})}, where)
    init_from = e.get("init_from")
    if init_from is not None:
        init_from = str(init_from)
        if "/" in init_from:
            init_from = str(_existing(root / init_from, path, f"adapter {name!r}: init_from"))
        else:
            Ref.parse(init_from)
    for key in ("rubric", "safety_prompts"):  # files, relative to the spec
        if key in evals:
            evals[key] = str(_existing(root / evals[key], path, f"adapter {name!r}: eval.{key}"))
    _check_rules(gate, metric, evals, where)
    max_new = int(evals.pop("max_new_tokens", task.get("max_new_tokens", 64)))
    return AdapterSpec(name, train_file, valid_file, test_file, metric, max_new, init_from, train, evals, gate)


def _task(path: Path, where: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(f"{where}: {path} is not valid JSON: {e}") from e


def _existing(p: Path, spec: Path, what: str) -> Path:
    if not p.exists():
        raise SpecError(f"{spec}: {what}: {p} does not exist")
    return p


def _settings(d: dict[str, Any], keys: dict[str, type], where: str) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k not in keys:
            raise SpecError(f"{where}: unknown setting {k!r} (known: {', '.join(sorted(keys))})")
        want = keys[k]
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise SpecError(f"{where}: {k} must be {want.__name__}, got {v!r}")
        out[k] = v
    if out.get("on_long", "truncate-prompt") not in (*ON_LONG, *OLD_NAMES):
        raise SpecError(f"{where}: on_long is one of {', '.join(ON_LONG)}")
    return out


def _gate(d: dict[str, Any], where: str) -> Gate:
    values = _settings(d, GATE_KEYS, f"{where}: gate")
    lo, hi = SCORE_RANGE
    if "min_score" in values and not lo <= values["min_score"] <= hi:
        raise SpecError(f"{where}: gate min_score {values['min_score']} can never be met (scores lie in [{lo}, {hi}])")
    for k in ("beat_base_by", "beat_prod_by"):
        if k in values and not -(hi - lo) <= values[k] < hi - lo:
            raise SpecError(f"{where}: gate {k} {values[k]} is impossible (scores lie in [{lo}, {hi}])")
    rules = tuple(_rule(r, where) for r in values.pop("require", []))
    if len({r.compared for r in rules if r.compared}) > 1:
        raise SpecError(f"{where}: gate rules compare with both prod and base; one side-by-side per gate")
    return Gate(**{k: values.get(k, getattr(Gate, k)) for k in GATE_KEYS if k != "require"}, require=rules)


def _rule(text: Any, where: str) -> Rule:
    m = RULE.match(text) if isinstance(text, str) else None
    if m is None:
        raise SpecError(f'{where}: gate rule {text!r} is not `FIGURE <=|>=|<|> NUMBER` (e.g. "poor_rate <= 0.1")')
    return Rule(m.group(1), m.group(2), float(m.group(3)))


def _check_rules(gate: Gate, metric: str, evals: dict[str, Any], where: str) -> None:
    """Every rule names a figure some configured grader gives, and judged figures have a judge."""
    graders = {metric, *evals.get("graders", ())} | ({"rubric"} if evals.get("rubric") else set())
    unknown = [g for g in evals.get("graders", ()) if g not in GRADERS]
    if unknown:
        raise SpecError(f"{where}: eval: unknown grader {unknown[0]!r}; choose from {', '.join(GRADERS)}")
    for r in gate.require:
        name = r.figure.removesuffix(f"_vs_{r.compared}") if r.compared else r.figure
        bare = name.split(".")[-1].removesuffix("_low").removesuffix("_high")
        if r.compared:
            ok = bare in PREFERENCE or bare == "failed_rate"
        else:
            given = {bare for g in graders for bare in FIGURES.get(g, ())} | graders | {"score", "failed_rate"}
            per_dimension = "rubric" in graders and bare.endswith("_good_rate")  # composition_good_rate, ...
            ok = bare in given or per_dimension or name.split(".")[0] in graders
        if not ok:
            raise SpecError(
                f"{where}: gate rule '{r}': no configured grader gives {name} (graders: {', '.join(sorted(graders))})"
            )
    judged = {"rubric", "safety"} & graders or any(r.compared for r in gate.require)
    if judged and not (evals.get("judge_url") and evals.get("judge_model")):
        raise SpecError(f"{where}: eval: a judge grades here; set judge_url and judge_model")
