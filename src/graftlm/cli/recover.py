"""`graftlm recover`: train the accuracy-recovery adapter of a compressed model by distillation."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from graftlm.cli.fields import add_fields, build
from graftlm.cli.options import add_placement, placement_from
from graftlm.recipes.recover import RecoverConfig, train_recovery_adapter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recover",
        help="train a LoRA adapter that wins back what compression lost",
        description=(
            "Distil the uncompressed --teacher into the compressed --student through a LoRA adapter: the "
            "student learns the teacher's next-token distributions (KL) on text the teacher writes itself, "
            "plus any --data text. Task adapters then start from it: graftlm train -m STUDENT --init-from OUT."
        ),
    )
    p.add_argument("--teacher", required=True, help="the uncompressed model (catalog name, directory or .gguf)")
    p.add_argument("--student", required=True, help="the compressed model directory (graftlm palettize)")
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write (e.g. adapters/recovery)")
    p.add_argument("--data", type=Path, action="append", default=[], help="more plain-text training text (repeatable)")
    add_placement(p)
    add_fields(p, RecoverConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = build(RecoverConfig, args, data=tuple(args.data))
    result = train_recovery_adapter(args.teacher, args.student, args.out, config, placement_from(args))
    Console(stderr=True).print(
        f"wrote {args.out}: {result.steps} steps on {result.tokens} tokens, final KL {result.train_loss:.4f} per token"
    )
    return 0
