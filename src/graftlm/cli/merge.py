"""`graftlm merge`: bake an adapter into the base model and write a checkpoint transformers loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from graftlm.cli.options import add_model
from graftlm.loading.merged import write_merged


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="bake an adapter into the base model",
        description=(
            "Write a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer) whose "
            "weights are the base model's with the adapter merged in: W + s·BA (DoRA: rescaled per row)."
        ),
    )
    p.add_argument("--adapter", type=Path, required=True, help="adapter folder (PEFT format)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    add_model(p, runtime=False)
    p.add_argument("--force", action="store_true", help="merge an adapter trained on another base model")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    write_merged(args.model, args.adapter, args.out, args.force)
    Console(stderr=True).print(f"wrote {args.out}")
    return 0
