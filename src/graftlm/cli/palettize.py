"""`graftlm palettize`: compress a model to k-means lookup tables at a target average bits per weight."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from graftlm.cli.fields import add_fields, build
from graftlm.loading.catalog import Placement
from graftlm.quant.palettize import PalettizeConfig
from graftlm.quant.plan import Plan
from graftlm.recipes.palettize import Calibration, Tuning, palettize_checkpoint


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
    add_fields(p, PalettizeConfig)
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", type=Path, action="append", default=[], help="plain-text calibration file (repeatable)")
    g.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the calibration passes run; the tables are fitted on the CPU (default: cuda if available)",
    )
    add_fields(g, Calibration)
    add_fields(p.add_argument_group("tuning (tables and scales trained to imitate the uncompressed model)"), Tuning)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    done = palettize_checkpoint(
        args.model,
        args.out,
        build(PalettizeConfig, args),
        build(Calibration, args, files=tuple(args.calib)),
        build(Tuning, args),
        Placement(args.device).device,
    )
    _report(done.plan, done.record, done.out, done.seconds)
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
