"""Palettized models against the uncompressed one: perplexity, task scores, size, memory, decode speed.

Peer: the uncompressed model (float32) it was made from. Variants: uniform 4-bit, uniform 2-bit and the
3.5-bit mix, with and without its recovery adapter (graftlm's defaults throughout: 16-row tables, row
scales, input scales where they help, activation-weighted k-means, GPTQ index assignment, the output head
at 4 bits or more in the mix, tables and scales tuned; the recovery adapter is `graftlm recover` with its
defaults, applied unmerged). Calibration, tuning and recovery text: real text from the tasks' domain, as a
user would give it with `--calib`/`--data` (the inputs of every 6th training example of the example tasks,
~33k tokens; see `calibration_text`); tuning and recovery add the 128 texts the teacher writes by default. Every
variant is measured in its own process, so resident memory is its own.

    python benchmarks/palettize.py [--model smollm2-135m-instruct] [--tokens 8192] [--task-limit 50]

Peer: llama.cpp's own quantizer on the same GGUF file, when llama-cpp-python is installed (see
`llama_cpp_peer.py`): perplexity on the same held-out tokens, bits per weight, size and decode speed.

Held-out text: the Python Language Reference as shipped in CPython (`pydoc_data.topics`), written by
the Python developers; calibration never sees it, nor any test example. Task scores: the model zero-shot
on the first `--task-limit` test examples of each example task (examples/*/test.jsonl).

Task adapters, as Apple ships them: each example task's adapter trained on the uncompressed model
(adapters/TASK, as `make demo` trains it, or trained under --work when missing or made for another base) against
one trained on the 3.5-bit mix starting from its recovery adapter (`graftlm train --init-from`), same data
and settings (the task's task.json), both scored on the whole test split. Built variants and adapters
are cached under --work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp_peer
import torch
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from graftlm.eval.runner import Task
from graftlm.model.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("summarize", "proofread", "extract")
VARIANTS = {"uniform 4-bit": ("4", "4"), "uniform 2-bit": ("2", "2"), "3.5-bit mix": ("3.5", "2,3,4,6,8")}


def held_out_text() -> list[str]:
    import pydoc_data.topics as topics

    return [topics.topics[k] for k in sorted(topics.topics)]


def held_out_chunks(tok: Tokenizer, tokens: int) -> list[list[int]]:
    from graftlm.eval.perplexity import text_chunks

    return text_chunks(tok, held_out_text(), 512, tokens)


def decode_prompt(tok: Tokenizer) -> list[int]:
    """The prompt every row's decode speed is timed after."""
    return tok.encode_chat([{"role": "user", "content": "Tell me about the sea."}])


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(model_name: str, tokens: int, task_limit: int, adapter: str | None = None) -> dict[str, float]:
    """Everything for one model, in this process (run by the parent through `--measure`)."""
    from graftlm.engine.generate import Generator
    from graftlm.engine.sampling import SamplingParams
    from graftlm.eval.perplexity import perplexity
    from graftlm.eval.runner import evaluate
    from graftlm.loading import catalog

    model, tok, source = catalog.load(model_name)
    if adapter:  # the recovery adapter stays a LoRA layer over the palettized weights (not merged)
        from graftlm.lora.peft_io import apply_adapter, read_adapter

        apply_adapter(model, read_adapter(Path(adapter)))
    out: dict[str, float] = {}
    gen = Generator(model, tok)
    prompt = decode_prompt(tok)
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    gen.generate([prompt], SamplingParams(max_new_tokens=4))  # warm-up
    t0 = time.perf_counter()
    gen.generate([prompt], params)
    out["decode_tok_s"] = 64 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    gen.generate([prompt] * 8, params)  # eight sequences at once, as a server batches them
    out["decode8_tok_s"] = 8 * 64 / (time.perf_counter() - t0)
    out["rss_mib"] = rss_mib()
    out["ppl"] = perplexity(model, held_out_chunks(tok, tokens))
    for task in TASKS:
        data = ROOT / "examples" / task / "test.jsonl"
        out[task] = evaluate(gen, data, example_task(task), limit=task_limit, label=task).score
    files = [f for f in source.checkpoint.iterdir() if f.suffix == ".safetensors"]
    extra = sum(f.stat().st_size for f in Path(adapter).glob("*.safetensors")) if adapter else 0
    out["size_mib"] = (sum(f.stat().st_size for f in files) + extra) / 2**20
    out["bpw"] = 8 * sum(f.stat().st_size for f in files) / model.num_parameters()
    layout = source.checkpoint / "palettization.json"
    if layout.exists():
        out["bpw"] = json.loads(layout.read_text())["bits_per_weight"]
    return out


CALIBRATION_EVERY = 6  # every 6th training input: ~33k tokens, the size of 128 self-written samples


def measure_gguf(path: Path, model_name: str, tokens: int, threads: int) -> dict[str, float]:
    """A llama.cpp file on the same held-out tokens as `measure` (run by the parent through `--measure-gguf`)."""
    from graftlm.loading import catalog

    tok = Tokenizer.from_dir(catalog.resolve(model_name).checkpoint)
    out = llama_cpp_peer.measure(path, held_out_chunks(tok, tokens), decode_prompt(tok), threads)
    return {**out, "rss_mib": rss_mib()}


def llama_cpp_rows(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The peer's rows, each file measured in its own process; none without llama-cpp-python or a GGUF source."""
    from graftlm.loading import catalog

    origin = catalog.resolve(args.model).origin
    if not llama_cpp_peer.available() or origin.suffix != ".gguf":
        print("llama.cpp peer skipped: needs llama-cpp-python and a model from a GGUF file", flush=True)
        return {}
    rows = {}
    for kind in llama_cpp_peer.TYPES:
        path = llama_cpp_peer.quantize(origin, kind, args.work, args.threads)
        cmd = [sys.executable, __file__, "--measure-gguf", str(path), "--model", args.model]
        cmd += ["--tokens", str(args.tokens), "--threads", str(args.threads)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        label = llama_cpp_peer.label(kind)
        rows[label] = json.loads(done.stdout.strip().splitlines()[-1])
        print(label, rows[label], flush=True)
    return rows


def calibration_text(work: Path) -> Path:
    """Real text from the user's domain for calibration and recovery, as a user would give it: the inputs
    of every 6th training example of the example tasks (Debian package descriptions, sentences of Debian's
    translations, changelog entries). Neither the held-out text nor any test example is in it."""
    out = work / "calibration.txt"
    inputs = []
    for task in TASKS:
        lines = (ROOT / "examples" / task / "train.jsonl").read_text(encoding="utf-8").splitlines()
        for line in lines[::CALIBRATION_EVERY]:
            user = json.loads(line)["messages"][0]["content"]
            inputs.append(user.split("\n\n", 1)[-1])  # the text, without the task's instruction
    text = "\n\n".join(inputs)
    if not out.exists() or out.read_text(encoding="utf-8") != text:
        work.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return out


def build(model: str, work: Path, label: str, bits: str, choices: str, calib: Path) -> Path:
    out = work / label.replace(" ", "-")
    layout = out / "palettization.json"
    record = json.loads(layout.read_text()) if layout.exists() else {}
    made_from = str(calib) in record.get("calibration", "") and layout.stat().st_mtime > calib.stat().st_mtime
    if not made_from:  # missing, or built from other (or older) calibration text
        from graftlm.quant.palettize import PalettizeConfig, widths
        from graftlm.recipes.palettize import Calibration, palettize_checkpoint

        config = PalettizeConfig(bits=float(bits), choices=widths(choices))
        palettize_checkpoint(model, out, config, Calibration(files=(calib,)))
    return out


def recovery(model: str, student: str, work: Path, data: Path) -> Path:
    out = work / "recovery"
    weights = out / "adapter_model.safetensors"
    if weights.exists() and weights.stat().st_mtime < (Path(student) / "palettization.json").stat().st_mtime:
        weights.unlink()  # made for an older build of the student
    if not weights.exists():
        from graftlm.recipes.recover import RecoverConfig, train_recovery_adapter

        train_recovery_adapter(model, student, out, RecoverConfig(data=(data,)))
    return out


def example_task(task: str) -> Task:
    spec = Task.beside(ROOT / "examples" / task / "test.jsonl")
    assert spec is not None, f"examples/{task} has no task.json"
    return spec


def trained_on(adapter: Path, fingerprint: str) -> bool:
    record = adapter / "training.json"
    return record.exists() and json.loads(record.read_text())["base_model"]["fingerprint"] == fingerprint


def task_adapter(model: str, fingerprint: str, task: str, out: Path, init_from: Path | None = None) -> Path:
    """The task's adapter on `model` (from `init_from` if given) with the task's own settings, as `make demo`
    trains it; trained unless `out` holds one for this model that is newer than `init_from`."""
    from graftlm.lora.config import LoraConfig
    from graftlm.train.sft import DataSpec, train_adapter
    from graftlm.train.trainer import TrainConfig

    record = out / "training.json"
    parent = init_from / "training.json" if init_from is not None else None
    stale = record.exists() and parent is not None and record.stat().st_mtime < parent.stat().st_mtime
    if not stale and trained_on(out, fingerprint):
        return out
    data = DataSpec(ROOT / "examples" / task / "train.jsonl", ROOT / "examples" / task / "valid.jsonl")
    config = TrainConfig(**example_task(task).train)  # type: ignore[arg-type]
    train_adapter(model, data, out, LoraConfig(), config, init_from=init_from)
    return out


def task_score(model_name: str, adapter: str, task: str) -> float:
    """One task's score on its whole test split, the adapter applied unmerged (run through `--score`)."""
    from graftlm.engine.generate import Generator
    from graftlm.eval.runner import evaluate
    from graftlm.loading import catalog
    from graftlm.lora.peft_io import apply_adapter, read_adapter

    model, tok, _ = catalog.load(model_name)
    apply_adapter(model, read_adapter(Path(adapter)))
    return evaluate(
        Generator(model, tok), ROOT / "examples" / task / "test.jsonl", example_task(task), label=task
    ).score


def task_adapter_table(args: argparse.Namespace, mix: str, recovered: Path) -> None:
    from graftlm.loading import catalog

    table = Table(title="task adapters: trained on the uncompressed model vs on the 3.5-bit mix from its recovery")
    for col in ("task", "metric", "float32 + adapter", "3.5-bit mix + adapter", "ratio", "training s (mix)"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    fingerprints = {name: catalog.load(name)[0].fingerprint() for name in (args.model, mix)}
    for task in TASKS:
        mine = ROOT / "adapters" / task  # as `make demo` trained it, if it was trained on this model
        if trained_on(mine, fingerprints[args.model]):
            float_adapter = mine
        else:
            float_adapter = task_adapter(args.model, fingerprints[args.model], task, args.work / task)
        mix_adapter = task_adapter(mix, fingerprints[mix], task, args.work / f"mix-{task}", init_from=recovered)
        scores = []
        for name, adapter in ((args.model, float_adapter), (mix, mix_adapter)):
            cmd = [sys.executable, __file__, "--score", task, "--measure", name, "--adapter", str(adapter)]
            done = subprocess.run([*cmd, "--threads", str(args.threads)], check=True, capture_output=True, text=True)
            scores.append(float(done.stdout.strip().splitlines()[-1]))
        seconds = json.loads((mix_adapter / "training.json").read_text())["metrics"]["seconds"]
        print(task, scores, flush=True)
        ratio = f"{scores[1] / scores[0]:.0%}" if scores[0] else "-"
        table.add_row(task, example_task(task).metric, f"{scores[0]:.3f}", f"{scores[1]:.3f}", ratio, f"{seconds:.0f}")
    Console().print(table)


def score_cell(row: dict[str, float], ref: dict[str, float], task: str) -> str:
    if task not in row:  # the peer's rows: scored by perplexity only
        return "-"
    return f"{row[task]:.3f} ({row[task] / ref[task]:.0%})" if ref[task] else f"{row[task]:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored (default 8192)")
    p.add_argument("--task-limit", type=int, default=50, help="test examples per task (default 50)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/graftlm-bench-palettize"))
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--score", help=argparse.SUPPRESS)
    p.add_argument("--measure-gguf", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp peer rows")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated palettized variants to build and measure (default: {', '.join(VARIANTS)})",
    )
    p.add_argument("--no-recovery", action="store_true", help="skip the recovery adapter (and the task adapters)")
    p.add_argument("--no-task-adapters", action="store_true", help="skip training and scoring the task adapters")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])  # training runs in here
    if args.score:
        print(task_score(args.measure, args.adapter, args.score))
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.tokens, args.task_limit, args.adapter)))
        return
    if args.measure_gguf:
        print(json.dumps(measure_gguf(args.measure_gguf, args.model, args.tokens, args.threads)))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}: choose among {', '.join(VARIANTS)}")
    calib = calibration_text(args.work)
    models: dict[str, tuple[str, str | None]] = {"uncompressed (float32)": (args.model, None)}
    for label in variants:
        bits, choices = VARIANTS[label]
        models[label] = (str(build(args.model, args.work, label, bits, choices, calib)), None)
    args.no_recovery |= "3.5-bit mix" not in models  # the recovery adapter is the mix's
    if not args.no_recovery:
        mix = models["3.5-bit mix"][0]
        models["3.5-bit mix + recovery"] = (mix, str(recovery(args.model, mix, args.work, calib)))
    rows = {}
    for label, (name, adapter) in models.items():
        cmd = [sys.executable, __file__, "--measure", name, "--tokens", str(args.tokens)]
        cmd += ["--adapter", adapter] if adapter else []
        cmd += ["--task-limit", str(args.task_limit), "--threads", str(args.threads)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
        rows[label] = json.loads(done.stdout.strip().splitlines()[-1])
        print(label, rows[label], flush=True)
    if not args.no_llama_cpp:
        rows.update(llama_cpp_rows(args))
    ref = rows["uncompressed (float32)"]
    table = Table(title=f"{args.model}: palettized variants vs the uncompressed model")
    cols = ("model", "bits/weight", "size MiB", "RSS MiB", "decode tok/s", "batch 8", "perplexity", "ppl ratio")
    for col in (*cols, *TASKS):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, r in rows.items():
        scores = [score_cell(r, ref, t) for t in TASKS]
        batch8 = f"{r['decode8_tok_s']:.1f}" if "decode8_tok_s" in r else "-"  # llama-cpp-python decodes one
        table.add_row(
            label, f"{r['bpw']:.2f}", f"{r['size_mib']:.0f}", f"{r['rss_mib']:.0f}", f"{r['decode_tok_s']:.1f}",
            batch8, f"{r['ppl']:.2f}", f"{r['ppl'] / ref['ppl']:.2f}x", *scores,
        )  # fmt: skip
    Console().print(table)
    if not args.no_recovery and not args.no_task_adapters:
        task_adapter_table(args, models["3.5-bit mix"][0], Path(models["3.5-bit mix + recovery"][1] or ""))


if __name__ == "__main__":
    main()
