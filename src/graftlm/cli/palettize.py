"""`graftlm palettize`: compress a model to k-means lookup tables at a target average bits per weight."""

from __future__ import annotations

import argparse
import copy
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from graftlm.cli.progress import bar, written
from graftlm.eval.perplexity import spread, text_chunks
from graftlm.model.catalog import load
from graftlm.model.load_hf import LAYOUT_FILE
from graftlm.quant.checkpoint import save_palettized
from graftlm.quant.pack import BITS
from graftlm.quant.palettize import HEAD_FLOOR, WEIGHTINGS, PalettizeConfig, PalettizeError, candidates, palettize
from graftlm.quant.plan import Plan
from graftlm.quant.probe import KLProbe
from graftlm.quant.sensitivity import CalibrationError, measure
from graftlm.quant.tune import TUNE_BATCH, TUNE_LR, TUNE_SAMPLES, TUNE_STEPS, tune_palettes
from graftlm.train.trainer import TrainConfig

log = logging.getLogger(__name__)

# sequences the plan's KL probe runs on: 4 of 256 tokens cost about a second per weight of SmolLM2-135M
# (3.5 minutes in all) and take its 3.5-bit mix from held-out perplexity 24.10 to 22.84 before tuning
KL_SAMPLES = 4


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "palettize",
        help="compress a model with k-means lookup tables (mixed 2-8 bits)",
        description=(
            "Replace every projection and the embedding by indices into small k-means lookup tables (one "
            "table per group of output rows, float16), choosing each weight's width from --choices so that "
            "the whole model averages --bits bits per weight with the least estimated loss. Sensitivities "
            "come from calibration text: --calib files, or text the model writes itself; each weight's "
            "estimates are scaled to its loss measured end to end at one width (--kl-samples). Last, the tables and "
            "scales are tuned by KL to the uncompressed model on that text (--tune-steps). The output is a "
            "checkpoint directory every graftlm command loads."
        ),
    )
    p.add_argument("model", help="model to compress: catalog name, checkpoint directory or .gguf file")
    p.add_argument("--out", type=Path, required=True, help="directory to write the palettized model to")
    p.add_argument("--bits", type=float, default=3.5, help="target average bits per weight, 2-8 (default: 3.5)")
    p.add_argument(
        "--choices",
        default=",".join(map(str, BITS)),
        help=f"bit widths a weight may get, comma-separated (default: {','.join(map(str, BITS))}; "
        "one width gives a uniform model)",
    )
    p.add_argument("--group-size", type=int, default=16, help="output rows per table; 0: one per tensor (default 16)")
    p.add_argument(
        "--weighting", choices=WEIGHTINGS, default="activation", help="what weights k-means (default: activation)"
    )
    p.add_argument(
        "--no-row-scale",
        dest="row_scale",
        action="store_false",
        help="no float16 scale per output row (rows of a group then share one table as they are)",
    )
    p.add_argument(
        "--no-gptq",
        dest="gptq",
        action="store_false",
        help="round each weight to its nearest table entry instead of GPTQ's error-compensating assignment",
    )
    p.add_argument(
        "--no-in-scale",
        dest="in_scale",
        action="store_false",
        help="no float16 input-column scales (otherwise tried per weight and kept where they lower the loss)",
    )
    p.add_argument(
        "--head-bits",
        type=int,
        default=HEAD_FLOOR,
        help=f"the least width the output head (a tied embedding) gets in a mixed plan; its loss on the model's "
        f"own calibration text understates its loss on real text (default: {HEAD_FLOOR}; 0: no floor)",
    )
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", type=Path, action="append", default=[], help="plain-text calibration file (repeatable)")
    g.add_argument(
        "--calib-samples",
        type=int,
        default=128,
        help="calibration sequences: samples the model writes, or at most this many pieces spread evenly over "
        "the --calib text (default 128)",
    )
    g.add_argument("--calib-length", type=int, default=256, help="tokens per calibration sequence (default 256)")
    g.add_argument("--seed", type=int, default=0, help="seed of the self-written calibration text")
    g.add_argument(
        "--kl-samples",
        type=int,
        default=KL_SAMPLES,
        help="calibration sequences on which each weight's loss at one width is measured end to end (the KL to "
        f"the uncompressed model) to scale the plan's estimates (default {KL_SAMPLES}; 0: estimates alone)",
    )
    t = p.add_argument_group("tuning (tables and scales trained to imitate the uncompressed model)")
    t.add_argument(
        "--tune-steps",
        type=int,
        default=TUNE_STEPS,
        help=f"steps of 8 sequences of the tuning text, KL to the uncompressed model (default {TUNE_STEPS}, one "
        "pass over the default text; 0: no tuning)",
    )
    t.add_argument(
        "--tune-samples",
        type=int,
        default=TUNE_SAMPLES,
        help="texts the uncompressed model writes itself, added to the calibration text for tuning (more kinds of "
        f"text to imitate it on; default {TUNE_SAMPLES}; 0: the calibration text alone)",
    )
    t.add_argument("--tune-lr", type=float, default=TUNE_LR, help=f"peak learning rate (default {TUNE_LR})")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        choices = tuple(sorted({int(c) for c in args.choices.split(",") if c.strip()}))
    except ValueError as e:
        raise PalettizeError(f"--choices must be bit widths separated by commas, got {args.choices!r}") from e
    config = PalettizeConfig(
        args.bits, choices, args.group_size, args.weighting, args.row_scale, args.gptq, args.in_scale, args.head_bits
    )
    model, tokenizer, source = load(args.model)
    if (source.checkpoint / LAYOUT_FILE).exists():
        raise PalettizeError(f"{args.model} is already palettized; palettize the uncompressed model instead")
    t0 = time.perf_counter()
    source_fingerprint = model.fingerprint()
    if args.tune_steps < 0:
        raise PalettizeError(f"--tune-steps must be 0 (no tuning) or more, not {args.tune_steps}")
    if args.tune_samples < 0:
        raise PalettizeError(f"--tune-samples must be 0 (the calibration text alone) or more, not {args.tune_samples}")
    if args.calib_samples < 1:
        raise PalettizeError(f"--calib-samples must be 1 or more, not {args.calib_samples}")
    if args.kl_samples < 0:
        raise PalettizeError(f"--kl-samples must be 0 (estimates alone) or more, not {args.kl_samples}")
    sensitivity = sequences = None
    if config.needs_calibration or args.tune_steps:
        if args.calib:
            texts = [f.read_text(encoding="utf-8") for f in args.calib]
            sequences = spread(text_chunks(tokenizer, texts, args.calib_length), args.calib_samples)
            origin = f"{len(sequences)} pieces of {', '.join(map(str, args.calib))}"
        else:
            sequences = written(model, tokenizer, args.calib_samples, args.calib_length, args.seed, "calibration")
            origin = f"{args.calib_samples} self-written samples, seed {args.seed}"
        if not sequences:
            raise CalibrationError("the calibration text is empty")
    if config.needs_calibration and sequences:
        with bar() as progress:
            task = progress.add_task("measuring sensitivity", total=len(sequences))
            sensitivity = measure(model, sequences, lambda: progress.advance(task), gram=config.gptq)
        log.info("sensitivity measured on %d tokens (%s)", sensitivity.tokens, origin)
    probe = None
    if args.kl_samples and len(config.choices) > 1 and sequences:
        probe = KLProbe(model, spread(sequences, args.kl_samples))
        log.info("the plan's estimates are scaled to KLs measured on %d tokens", probe.tokens)
    teacher = copy.deepcopy(model) if args.tune_steps else None
    tuning_text: list[list[int]] = []
    if teacher is not None and sequences and args.tune_samples:
        seed = args.seed + 1_000  # not the self-written calibration text again
        tuning_text = written(model, tokenizer, args.tune_samples, args.calib_length, seed, "tuning")
    with bar() as progress:
        task = progress.add_task("k-means tables", total=candidates(model))
        plan, record = palettize(model, config, sensitivity, lambda _: progress.advance(task), probe)
    del probe
    if teacher is not None and sequences:
        tune = TrainConfig(lr=args.tune_lr, batch_size=TUNE_BATCH, max_length=args.calib_length, seed=args.seed)
        result = tune_palettes(model, teacher, sequences + tuning_text, tune, args.tune_steps, tokenizer.pad_id)
        record["tuning"] = {
            "steps": result.steps,
            "lr": args.tune_lr,
            "sequences": {"calibration": len(sequences), "self-written": len(tuning_text)},
            "final_kl": result.train_loss,
        }
        del teacher
    record["source"] = {"model": args.model, "fingerprint": source_fingerprint}
    if sequences:
        record["calibration"] = origin
    save_palettized(args.out, model, tokenizer, record)
    _report(plan, record, args.out, time.perf_counter() - t0)
    return 0


def _report(plan: Plan, record: dict[str, Any], out: Path, seconds: float) -> None:
    console = Console()
    table = Table(title="palettization plan (error: relative squared error of the weight)")
    for col in ("tensor", "bits", "rel. error"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for row in record["plan"]:
        table.add_row(str(row["tensor"]), str(row["bits"]), f"{row['rel_error']:.4f}")
    console.print(table)
    counts = Counter(o.bits for o in plan.choice.values())
    mix = ", ".join(f"{n} at {b} bits" for b, n in sorted(counts.items()))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    console.print(
        f"{plan.bits_per_weight:.3f} bits per weight (target {record['target_bits']}; {mix}); "
        f"{size / 2**20:.1f} MB in {out}; {seconds:.0f} s"
    )
    if "tuning" in record:
        t = record["tuning"]
        console.print(f"tables and scales tuned: {t['steps']} steps, KL to the uncompressed model {t['final_kl']:.4f}")
