"""Prefill and decode speed of graftlm's generator against transformers, on the same weights.

Peer: transformers `LlamaForCausalLM.generate` (float32, greedy, KV cache), loaded from the very
checkpoint directory graftlm reads. Both run in this process with the same thread count.

    python benchmarks/decode.py [--model smollm2-135m-instruct] [--threads 2] [--repeats 3]

Prints prefill ms per prompt token (512-token prompt) and decode tokens/s at batch 1, 8 and 32
(128-token prompts, 64 new tokens; prefill time subtracted), with the ratio graftlm / transformers.
With --paths, also graftlm's decode rate with the few-row products' path chosen per shape by timing
(the default), always the gemv kernel and always PyTorch's, in turn in each round (medians).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from rich.console import Console
from rich.table import Table

from graftlm.engine.generate import Generator
from graftlm.engine.kv_cache import KVCache
from graftlm.engine.sampling import SamplingParams
from graftlm.loading import catalog
from graftlm.model import linear


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_rate(run: Callable[[int], object], batch: int, n: int, repeats: int) -> float:
    """Tokens/s of `n` decode steps: a run of n+1 new tokens minus a run of 1 (prefill and first token)."""
    return batch * n / (median_time(partial(run, n + 1), repeats) - median_time(partial(run, 1), repeats))


def ours_generate(gen: Generator, prompts: list[list[int]], new_tokens: int) -> None:
    gen.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))


def ref_generate(ref: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> None:
    with torch.inference_mode():
        ref.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=catalog.DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--paths", action="store_true", help="also compare graftlm's product paths")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    model, tok, source = catalog.load(args.model)
    ref = LlamaForCausalLM.from_pretrained(source.checkpoint, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None
    gen = Generator(model, tok)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    console = Console()
    console.print(
        f"{source.name}: {model.num_parameters() / 1e6:.1f}M parameters, float32, "
        f"{torch.get_num_threads()} threads, medians of {args.repeats}"
    )

    rows = []
    long_prompt = torch.randint(100, vocab, (1, 512), generator=g)

    def ours_prefill() -> None:
        with torch.inference_mode():
            model(long_prompt, cache=KVCache(model.config, 1, 512), last_only=True)

    def ref_prefill() -> None:
        with torch.inference_mode():
            ref(long_prompt, use_cache=True, logits_to_keep=1)

    a, b = (median_time(f, args.repeats) * 1000 / 512 for f in (ours_prefill, ref_prefill))
    rows.append(("prefill ms/token (512-token prompt)", a, b, b / a))

    n = args.new_tokens
    for batch in (int(x) for x in args.batches.split(",")):
        prompts = torch.randint(100, vocab, (batch, 128), generator=g)
        ours = partial(ours_generate, gen, prompts.tolist())
        theirs = partial(ref_generate, ref, prompts)
        a, b = (decode_rate(f, batch, n, args.repeats) for f in (ours, theirs))
        rows.append((f"decode tokens/s, batch {batch}", a, b, a / b))

    table = Table(title="graftlm vs transformers (ratio > 1: graftlm faster)")
    for col in ("measure", "graftlm", "transformers", "ratio"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for name, a, b, r in rows:
        table.add_row(name, f"{a:.2f}", f"{b:.2f}", f"{r:.2f}x")
    console.print(table)
    if args.paths:
        compare_paths(gen, torch.randint(100, vocab, (32, 128), generator=g), args, console)


def compare_paths(gen: Generator, prompts: torch.Tensor, args: argparse.Namespace, console: Console) -> None:
    """Decode tokens/s with `linear.paths` timing each shape (auto), forced to the kernel, forced to PyTorch."""
    modes = {"auto": None, "kernel": True, "PyTorch": False}
    table = Table(title="graftlm decode tokens/s by product path (auto: each shape's faster path, timed)")
    for col in ("batch", *modes, "auto / best forced"):
        table.add_column(col, justify="right")
    for batch in (int(x) for x in args.batches.split(",")):
        run = partial(ours_generate, gen, prompts[:batch].tolist())
        rates: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.repeats):  # the modes in turn, so that a slow spell of the host hits all three
            for mode, force in modes.items():
                linear.paths.force = force
                rates[mode].append(decode_rate(run, batch, args.new_tokens, 1))
        linear.paths.force = None
        med = {m: statistics.median(r) for m, r in rates.items()}
        ratio = med["auto"] / max(med["kernel"], med["PyTorch"])
        table.add_row(str(batch), *(f"{med[m]:.2f}" for m in modes), f"{ratio:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
