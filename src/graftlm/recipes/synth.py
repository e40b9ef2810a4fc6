"""`graftlm synth`: training data by rejection sampling from a committee of teachers.

For every prompt each teacher proposes k answers: graftlm's own model, with or without an adapter, run
through the serving engine (all local teachers batched together), or any OpenAI-compatible endpoint
(graftlm's server, vLLM, a hosted API). The reward's graders score every answer; the best answer that
passes is kept as a training line, and a prompt with no passing answer is left out (rejection sampling,
as in Apple's teacher committee and in RAFT / ReST). The output is chat JSONL that `graftlm train`
reads, plus a report of pass rates per teacher.

Prompts are deduplicated (same text up to case and spaces). The run goes in rounds of `--chunk` prompts
and appends each round's results to `OUT.progress.jsonl`, so a stopped run started again with the same
settings continues where it was; the output and report are written atomically at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from graftlm.engine.adapter_finder import Source
from graftlm.engine.engine import Engine, EngineConfig
from graftlm.engine.offline import Job, run_jobs
from graftlm.engine.sampling import SamplingParams
from graftlm.errors import ConfigError
from graftlm.eval.answers import adapter_rank
from graftlm.eval.grade import Case
from graftlm.eval.judge import Judge, JudgeConfig
from graftlm.eval.rewards import Reward
from graftlm.eval.runner import load_cases
from graftlm.fileio import atomic_write
from graftlm.loading.catalog import Placement
from graftlm.progress import progress
from graftlm.setting import setting

log = logging.getLogger(__name__)
REPORT_FORMAT = "graftlm-synth/1"


@dataclass(frozen=True)
class SynthConfig:
    k: int = setting(4, "answers each teacher proposes per prompt")
    temperature: float = setting(0.8, "sampling temperature of every teacher")
    top_p: float = setting(0.95, "nucleus sampling mass")
    max_new_tokens: int = setting(128, "most tokens per answer")
    chunk: int = setting(64, "prompts per round; progress is saved after each")
    seed: int = setting(0, "same seed, same answers (local teachers; endpoints as far as they honour seeds)")
    concurrency: int = setting(4, "requests in flight to each endpoint teacher")
    keep_cut: bool = setting(False, "keep answers cut off at --max-new-tokens (by default they fail)")

    def __post_init__(self) -> None:
        if self.k < 1 or self.chunk < 1 or self.max_new_tokens < 1 or self.concurrency < 1:
            raise ConfigError("k, chunk, max_new_tokens and concurrency must be at least 1")
        if not (0 <= self.temperature <= 5 and 0 < self.top_p <= 1):
            raise ConfigError("temperature must be within [0, 5] and top_p within (0, 1]")


@dataclass(frozen=True)
class Teacher:
    """base (the model alone), an adapter folder, or URL#MODEL for an OpenAI-compatible endpoint."""

    spec: str
    adapter: Path | None = None
    endpoint: JudgeConfig | None = None

    @classmethod
    def parse(cls, spec: str) -> Teacher:
        if spec == "base":
            return cls(spec)
        if spec.startswith(("http://", "https://")):
            url, _, model = spec.partition("#")
            if not model:
                raise ConfigError(f"teacher {spec!r}: name the endpoint's model as URL#MODEL")
            key = os.environ.get("GRAFTLM_TEACHER_KEY", "")
            return cls(spec, endpoint=JudgeConfig(url=url, model=model, api_key=key, response_format="none"))
        path = Path(spec)
        adapter_rank(path)  # a clear error when it is not an adapter folder
        return cls(spec, adapter=path)

    @property
    def local(self) -> bool:
        return self.endpoint is None


def prompt_key(case: Case) -> str:
    """Same prompt up to case and spacing: same key (what deduplication compares)."""
    norm = [{"role": m["role"], "content": " ".join(m["content"].lower().split())} for m in case.messages]
    return hashlib.sha256(json.dumps(norm, sort_keys=True).encode()).hexdigest()[:24]


def seed_of(config: SynthConfig, prompt: int, teacher: int, j: int) -> int:
    """Sample j of a teacher for the prompt at this place in the file: the same whatever the rounds."""
    return config.seed * 1_000_003 + (prompt * 64 + teacher) * config.k + j


def _local_answers(
    engine: Engine,
    tok: Any,
    teachers: Sequence[tuple[int, Teacher]],
    chunk: Sequence[tuple[int, Case]],
    config: SynthConfig,
) -> dict[str, list[list[str]]]:
    jobs, keys = [], []
    for t_i, t in teachers:
        adapters = ((Source(f"teacher{t_i}", "", t.adapter), 1.0),) if t.adapter is not None else ()
        for c_i, (place, case) in enumerate(chunk):
            prompt = tok.encode_chat(case.messages)
            for j in range(config.k):
                seed = seed_of(config, place, t_i, j)
                params = SamplingParams(config.max_new_tokens, config.temperature, top_p=config.top_p, seed=seed)
                jobs.append(Job(prompt, params, adapters))
                keys.append((t.spec, c_i))
    out: dict[str, list[list[Answer]]] = {t.spec: [[] for _ in chunk] for _, t in teachers}
    for (spec, c_i), done in zip(keys, run_jobs(engine, jobs, "teachers answer"), strict=True):
        out[spec][c_i].append(Answer(done.text.strip(), done.finish_reason == "length"))
    return out


def _endpoint_answers(t_i: int, t: Teacher, chunk: Sequence[tuple[int, Case]], config: SynthConfig) -> list[list[str]]:
    assert t.endpoint is not None
    client = Judge(t.endpoint)

    def ask(item: tuple[int, int]) -> Answer:
        c_i, j = item
        place, case = chunk[c_i]
        text, why = client.chat(
            case.messages,
            temperature=config.temperature,
            top_p=config.top_p,
            max_tokens=config.max_new_tokens,
            seed=seed_of(config, place, t_i, j),
        )
        return Answer(text.strip(), why == "length")

    items = [(c, j) for c in range(len(chunk)) for j in range(config.k)]
    with ThreadPoolExecutor(config.concurrency) as pool, progress(f"{t.spec} answers", len(items), "answers") as bar:
        answers = []
        for a in pool.map(ask, items):
            answers.append(a)
            bar.advance(1)
    return [answers[c * config.k : (c + 1) * config.k] for c in range(len(chunk))]


@dataclass(frozen=True)
class Answer:
    text: str
    cut: bool = False  # stopped by the token limit, not by the model: an unfinished answer


def choose(
    case: Case, candidates: dict[str, list[Answer]], reward: Reward, keep_cut: bool = False
) -> tuple[dict[str, Any] | None, dict[str, tuple[int, int]]]:
    """The best passing answer (highest reward; the first teacher's, then the first sample, on ties) as a
    training line, or None when none passes; and (passed, proposed) per teacher. Empty answers fail, and
    answers cut off at the token limit unless `keep_cut`."""
    flat = [(spec, a) for spec, answers in candidates.items() for a in answers]
    scored = reward.score([case] * len(flat), [a.text for _, a in flat])
    counts = {spec: (0, len(answers)) for spec, answers in candidates.items()}
    best: tuple[float, int] | None = None
    for i, ((spec, answer), s) in enumerate(zip(flat, scored, strict=True)):
        if s.passed and answer.text and (keep_cut or not answer.cut):
            counts[spec] = (counts[spec][0] + 1, counts[spec][1])
            if best is None or s.reward > best[0]:
                best = (s.reward, i)
    if best is None:
        return None, counts
    spec, answer = flat[best[1]]
    line = {"messages": [*case.messages, {"role": "assistant", "content": answer.text}], "teacher": spec}
    return line | {"reward": round(best[0], 6)}, counts


def synthesize(
    model_name: str,
    prompts: Path,
    teachers: Sequence[Teacher],
    reward: Reward,
    out: Path,
    config: SynthConfig = SynthConfig(),
    place: Placement = Placement(),
) -> dict[str, Any]:
    """Rejection-sampled training data from `prompts` to `out` (JSONL) and its report (`out` + .report.json)."""
    if not teachers:
        raise ConfigError("name at least one --teacher (base, an adapter folder, or URL#MODEL)")
    if len(teachers) > 64:
        raise ConfigError("at most 64 teachers")
    every = load_cases(prompts, need_reference=False)
    cases = list({prompt_key(c): c for c in reversed(every)}.values())[::-1]  # the first of each prompt, in order
    dropped = len(every) - len(cases)
    settings = {"teachers": [t.spec for t in teachers], "reward": reward.spec, **asdict(config)}
    done = _resume(out, settings)
    todo = [(i, c) for i, c in enumerate(cases) if prompt_key(c) not in done]
    log.info(
        "%d prompts (%d duplicates left out), %d already done, %d teachers",
        len(cases),
        dropped,
        len(done),
        len(teachers),
    )
    local = [(i, t) for i, t in enumerate(teachers) if t.local]
    engine = _engine(place, model_name, [t for _, t in local], config, cases) if local and todo else None
    try:
        with progress("synthesizing", len(todo), "prompts") as bar:
            for r in range(0, len(todo), config.chunk):
                chunk = todo[r : r + config.chunk]
                answers: dict[str, list[list[Answer]]] = {}
                if engine is not None:
                    answers |= _local_answers(engine, engine.tokenizer, local, chunk, config)
                for t_i, t in enumerate(teachers):
                    if not t.local:
                        answers[t.spec] = _endpoint_answers(t_i, t, chunk, config)
                lines = []
                for c_i, (_, case) in enumerate(chunk):
                    kept, counts = choose(
                        case, {t.spec: answers[t.spec][c_i] for t in teachers}, reward, config.keep_cut
                    )
                    lines.append({"key": prompt_key(case), "kept": kept, "counts": counts})
                _append(_progress_file(out), lines)
                done |= {line["key"]: line for line in lines}
                bar.advance(len(chunk))
    finally:
        if engine is not None:
            engine.stop()
    return _finish(out, cases, done, teachers, settings, dropped)


def _engine(
    place: Placement, model_name: str, local: Sequence[Teacher], config: SynthConfig, cases: Sequence[Case]
) -> Engine:
    model, tok, _ = place.load(model_name)
    longest = max(len(tok.encode_chat(c.messages)) for c in cases) + config.max_new_tokens
    ranks = [adapter_rank(t.adapter) for t in local if t.adapter is not None]
    engine_config = EngineConfig(
        max_batch=32,
        max_len=longest,
        max_rank=max(ranks, default=8),
        adapter_cache_mb=1024,
        max_waiting=2**31,
        max_queued_per_tenant=2**31,
    )
    return Engine(model, tok, engine_config)


def _progress_file(out: Path) -> Path:
    return out.with_name(out.name + ".progress.jsonl")


def _resume(out: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What an earlier run with the same settings finished (its progress file); {} for a new run."""
    path = _progress_file(out)
    if not path.is_file():
        _append(path, [{"settings": settings}])
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or lines[0].get("settings") != settings:
        raise ConfigError(
            f"{path} holds an earlier run with other settings; remove it to start again, or run with those settings"
        )
    return {line["key"]: line for line in lines[1:]}


def _append(path: Path, lines: list[dict[str, Any]]) -> None:
    with path.open("a") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _finish(
    out: Path,
    cases: Sequence[Case],
    done: dict[str, dict[str, Any]],
    teachers: Sequence[Teacher],
    settings: dict[str, Any],
    dropped: int,
) -> dict[str, Any]:
    kept = [done[prompt_key(c)]["kept"] for c in cases if done[prompt_key(c)]["kept"] is not None]
    per_teacher = {}
    for t in teachers:
        passed = sum(done[prompt_key(c)]["counts"][t.spec][0] for c in cases)
        proposed = sum(done[prompt_key(c)]["counts"][t.spec][1] for c in cases)
        chosen = sum(1 for k in kept if k["teacher"] == t.spec)
        per_teacher[t.spec] = {
            "passed": passed,
            "proposed": proposed,
            "pass_rate": passed / max(1, proposed),
            "kept": chosen,
        }
    report = {
        "format": REPORT_FORMAT,
        "settings": settings,
        "prompts": len(cases),
        "duplicates_left_out": dropped,
        "kept": len(kept),
        "keep_rate": len(kept) / max(1, len(cases)),
        "teachers": per_teacher,
    }
    atomic_write(out, "".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept))
    atomic_write(out.with_name(out.name + ".report.json"), json.dumps(report, indent=1) + "\n")
    _progress_file(out).unlink(missing_ok=True)
    log.info("kept %d of %d prompts (%.0f%%) in %s", len(kept), len(cases), 100 * report["keep_rate"], out)
    for spec, t in per_teacher.items():
        log.info(
            "teacher %s: %d of %d answers passed (%.0f%%), %d kept",
            spec,
            t["passed"],
            t["proposed"],
            100 * t["pass_rate"],
            t["kept"],
        )
    return report
