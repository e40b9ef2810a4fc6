"""`graftlm train`: a LoRA adapter from JSONL in one command."""

from __future__ import annotations

import argparse
from pathlib import Path

from graftlm.cli.fields import add_fields, build
from graftlm.cli.options import add_model, add_placement, placement_from
from graftlm.lora.config import LoraConfig
from graftlm.train.sft import DataSpec, train_adapter
from graftlm.train.trainer import TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a LoRA adapter from JSONL",
        description=(
            "Train a LoRA adapter. Each JSONL line is chat 'messages' (OpenAI fine-tuning format), "
            "'prompt'/'completion', or 'text'; loss is taken on assistant/completion tokens only. The output "
            "folder is a PEFT adapter plus training.json (config, data sha256, base fingerprint, metrics)."
        ),
    )
    p.add_argument("--data", type=Path, required=True, help="training JSONL file")
    p.add_argument("--valid", type=Path, default=None, help="validation JSONL file")
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write (e.g. adapters/NAME)")
    add_model(p, runtime=False)
    add_placement(p)
    g = p.add_argument_group("adapter")
    g.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="ADAPTER",
        help="start from this adapter's weights and settings, e.g. a palettized base's recovery adapter "
        "(the rank, target and layer options are then taken from it)",
    )
    add_fields(g, LoraConfig)
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    g.add_argument(
        "--storage-dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="dtype of the saved weights (default: bfloat16)",
    )
    t = p.add_argument_group("training")
    add_fields(t, TrainConfig)
    add_fields(t, DataSpec)
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this --out")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    lora = build(LoraConfig, args, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank)
    data = build(DataSpec, args, train=args.data, valid=args.valid)
    config = build(TrainConfig, args)
    train_adapter(
        args.model, data, args.out, lora, config, args.resume, args.storage_dtype, args.init_from, placement_from(args)
    )
    return 0
