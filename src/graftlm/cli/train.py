"""`graftlm train`: a LoRA adapter from JSONL in one command."""

from __future__ import annotations

import argparse
from pathlib import Path

from graftlm.cli.options import add_model
from graftlm.lora.config import TARGETS, LoraConfig
from graftlm.train.sft import DataSpec, train_adapter
from graftlm.train.trainer import TrainConfig


def _layers(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return tuple(out)


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
    g = p.add_argument_group("adapter")
    g.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="ADAPTER",
        help="start from this adapter's weights and settings, e.g. a palettized base's recovery adapter "
        "(the rank, target and layer options are then taken from it)",
    )
    g.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default: 0)")
    g.add_argument("--targets", default=",".join(TARGETS), help="comma-separated projections (default: all seven)")
    g.add_argument("--layers", type=_layers, default=None, help="layers to adapt, e.g. 0-11,20 (default: all)")
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank) (rsLoRA)")
    g.add_argument("--dora", action="store_true", help="weight-decomposed LoRA (DoRA)")
    g.add_argument(
        "--storage-dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="dtype of the saved weights (default: bfloat16)",
    )
    t = p.add_argument_group("training")
    t.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: 2e-4)")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch", type=int, default=8, help="examples per micro-batch (default: 8)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    t.add_argument("--max-length", type=int, default=512, help="tokens per example (default: 512)")
    t.add_argument(
        "--on-long",
        choices=("truncate", "reject"),
        default="truncate",
        help="what to do with longer examples (default: truncate)",
    )
    t.add_argument("--raw", action="store_true", help="prompt/completion lines without the chat template")
    t.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of steps (default: 0.05)")
    t.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (default: all epochs)")
    t.add_argument("--eval-every", type=int, default=50, help="steps between validations (default: 50)")
    t.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (default: 100)")
    t.add_argument("--seed", type=int, default=0, help="same seed, same data: same adapter (default: 0)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this --out")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    lora = LoraConfig(
        r=args.rank,
        alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
        dropout=args.dropout,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        layers=args.layers,
        use_rslora=args.rslora,
        use_dora=args.dora,
    )
    config = TrainConfig(
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        warmup=args.warmup,
        seed=args.seed,
        eval_every=args.eval_every,
        save_every=args.save_every,
        max_steps=args.max_steps,
    )
    data = DataSpec(args.data, args.valid, args.on_long, chat=not args.raw)
    train_adapter(args.model, data, args.out, lora, config, args.resume, args.storage_dtype, init_from=args.init_from)
    return 0
