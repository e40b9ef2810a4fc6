"""Decode-step speed with a different LoRA adapter per row: gather vs grouped, against PEFT.

Peer: PEFT's mixed-batch forward (`adapter_names=[...]`, one adapter name per row) on transformers,
same base weights, same adapters (rank 16 on all seven projections), float32, same thread count.

    python benchmarks/multi_lora.py [--batch 32] [--threads 2] [--steps 16]

Prints decode tokens/s (128-token context) for: no adapter; one adapter on every row; 8 and 32
distinct adapters; for graftlm's `kernel` (BGMV), `gather`, `grouped` and `auto` strategies (adapters
held in bf16, as the serving engine holds them) and for PEFT.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from graftlm.engine.kv_cache import KVCache
from graftlm.loading import catalog
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.batched import AdapterBatch
from graftlm.lora.config import LoraConfig
from graftlm.lora.model import add_lora, lora_layers, lora_state_dict
from graftlm.lora.peft_io import read_adapter, save_adapter
from graftlm.lora.slots import AdapterSlots

CONTEXT = 128


def make_adapters(ckpt: Path, n: int, out: Path) -> list[Path]:
    model, _ = load_checkpoint(ckpt)
    config = LoraConfig(r=16, alpha=32)
    add_lora(model, config)
    paths = []
    for i in range(n):
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.normal_(0, 0.01)
        paths.append(out / f"a{i}")
        save_adapter(paths[-1], config, lora_state_dict(model), model.fingerprint())
    return paths


def per_step(fn: Callable[[int], None], steps: int) -> float:
    fn(0)
    times = []
    for i in range(1, steps + 1):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=catalog.DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peft import PeftModel
    from transformers import DynamicCache, LlamaForCausalLM

    source = catalog.resolve(args.model)
    b = args.batch
    tmp = Path(tempfile.mkdtemp())
    paths = make_adapters(source.checkpoint, 32, tmp)
    model, _ = load_checkpoint(source.checkpoint)
    slots = AdapterSlots(model, n_slots=32, r_max=16, dtype=torch.bfloat16)  # as the serving engine holds them
    for i, p in enumerate(paths):
        slots.load(i, read_adapter(p))
    ref = LlamaForCausalLM.from_pretrained(source.checkpoint, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(ref, paths[0], adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        peft.load_adapter(p, adapter_name=f"a{i}")

    prompt = torch.randint(100, model.config.vocab_size, (b, CONTEXT), generator=torch.Generator().manual_seed(0))
    mixes = {
        "no adapter": [-1] * b,
        "1 adapter": [0] * b,
        "8 adapters": [i % 8 for i in range(b)],
        f"{min(32, b)} adapters": [i % 32 for i in range(b)],
    }
    console = Console()
    table = Table(title=f"decode tokens/s, batch {b}, context {CONTEXT}, {torch.get_num_threads()} threads")
    cols = ("rows use", "kernel", "gather", "grouped", "auto", "PEFT adapter_names", "auto / PEFT")
    for col in cols:
        table.add_column(col, justify="right")
    tok = torch.full((b, 1), 7)
    for label, rows in mixes.items():
        rates = []
        for strategy in ("kernel", "gather", "grouped", "auto"):
            cache = KVCache(model.config, b, CONTEXT + args.steps + 2)
            batch = AdapterBatch.of(rows, strategy)
            with torch.inference_mode():
                model(prompt, cache=cache, last_only=True, adapters=batch)

                def step(i: int, cache: KVCache = cache, batch: AdapterBatch = batch) -> None:
                    model(tok, cache=cache, start=CONTEXT + i, last_only=True, adapters=batch)

                rates.append(b / per_step(step, args.steps))
        names = ["__base__" if r < 0 else f"a{r}" for r in rows]
        kv = DynamicCache()
        with torch.inference_mode():
            peft(prompt, past_key_values=kv, use_cache=True, adapter_names=names, logits_to_keep=1)

            def peft_step(i: int, kv: DynamicCache = kv, names: list[str] = names) -> None:
                peft(tok, past_key_values=kv, use_cache=True, adapter_names=names, logits_to_keep=1)

            theirs = b / per_step(peft_step, args.steps)
        table.add_row(label, *(f"{r:.1f}" for r in rates), f"{theirs:.1f}", f"{rates[3] / theirs:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
