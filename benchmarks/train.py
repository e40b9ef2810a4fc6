"""LoRA training speed and peak memory: graftlm's trainer step against PEFT + transformers.

Peer: PEFT `get_peft_model` on transformers' `LlamaForCausalLM` (float32, SDPA attention), the usual
loop (forward with labels, backward, AdamW step). Same base weights, rank 16 / alpha 32 on all seven
projections, same batches (sequence length and batch size below, loss on the second half of each
sequence, as a prompt/completion split), same thread count. Each side runs in its own process so
peak resident memory is its own.

    python benchmarks/train.py [--seq 256] [--batch 8] [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from graftlm.model import catalog


def batches(vocab: int, n: int, batch: int, seq: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab, (batch, seq), generator=g) for _ in range(n)]


def run_graftlm(args: argparse.Namespace) -> float:
    from graftlm.lora.config import LoraConfig
    from graftlm.train.data import Batch
    from graftlm.train.losses import completion_loss
    from graftlm.train.trainer import TrainConfig, Trainer

    model, _, _ = catalog.load(args.model)
    trainer = Trainer(model, LoraConfig(r=16, alpha=32), TrainConfig(lr=1e-4), pad_id=0)
    data = batches(model.config.vocab_size, args.steps + 1, args.batch, args.seq)
    targets = torch.zeros(args.batch, args.seq, dtype=torch.bool)
    targets[:, args.seq // 2 :] = True
    times = []
    for tokens in data:
        t0 = time.perf_counter()
        loss, n = completion_loss(model, Batch(tokens, targets, tokens.numel()))
        (loss / n).backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return args.batch * args.seq / (sum(times[1:]) / len(times[1:]))


def run_peft(args: argparse.Namespace) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    source = catalog.resolve(args.model)
    base = LlamaForCausalLM.from_pretrained(source.checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = batches(base.config.vocab_size, args.steps + 1, args.batch, args.seq)
    times = []
    for tokens in data:
        labels = tokens.clone()
        labels[:, : args.seq // 2] = -100
        t0 = time.perf_counter()
        model(input_ids=tokens, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return args.batch * args.seq / (sum(times[1:]) / len(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=catalog.DEFAULT_MODEL)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=("graftlm", "peft"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only:
        tps = (run_graftlm if args.only == "graftlm" else run_peft)(args)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"tokens_per_s": tps, "peak_mb": peak_mb}))
        return
    results = {}
    for side in ("graftlm", "peft"):
        cmd = [sys.executable, __file__, "--only", side, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
    ours, theirs = results["graftlm"], results["peft"]
    table = Table(
        title=f"LoRA training, rank 16 all projections, batch {args.batch} x {args.seq} tokens, {args.threads} threads"
    )
    for col in ("measure", "graftlm", "PEFT + transformers", "ratio"):
        table.add_column(col, justify="right")
    table.add_row(
        "training tokens/s",
        f"{ours['tokens_per_s']:.0f}",
        f"{theirs['tokens_per_s']:.0f}",
        f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x",
    )
    table.add_row(
        "peak resident MB",
        f"{ours['peak_mb']:.0f}",
        f"{theirs['peak_mb']:.0f}",
        f"{ours['peak_mb'] / theirs['peak_mb']:.2f}x",
    )
    Console().print(table)


if __name__ == "__main__":
    main()
