"""Prefill and decode speed of graftlm's generator against transformers, on the same weights.

Peer: transformers `LlamaForCausalLM.generate` (float32, greedy, KV cache), loaded from the very
checkpoint directory graftlm reads. Both run in this process with the same thread count.

    python benchmarks/decode.py [--model smollm2-135m-instruct] [--threads 2] [--repeats 3]

Prints prefill ms per prompt token (512-token prompt) and decode tokens/s at batch 1, 8 and 32
(128-token prompts, 64 new tokens; prefill time subtracted), with the ratio graftlm / transformers.
With --paths, also graftlm's decode rate with the few-row products' path chosen per shape by timing
(the default), always the gemv kernel and always PyTorch's, in turn in each round (medians).

With --palettized DIR (repeatable: checkpoints `graftlm palettize` wrote) the compressed models decode
too, each with its integer products (the default: int8 tables, activations in 8 bits per block) and
with the float kernel, beside graftlm's float32 model; one sequence both through the native step (the
default: `graftlm.engine.native_step`) and through the model's forward every step. With --gguf FILE
(repeatable; llama-cpp-python installed: the `bench` extra) llama.cpp decodes those files at batch 1 as
the peer. All of them take turns within each round, so a slow spell of the host hits every side.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

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
    ap.add_argument("--palettized", action="append", default=[], metavar="DIR", help="a palettized checkpoint")
    ap.add_argument("--gguf", action="append", default=[], metavar="FILE", help="a GGUF file for llama.cpp")
    ap.add_argument(
        "--decode-ppl",
        type=int,
        default=0,
        metavar="TOKENS",
        help="held-out tokens to score one at a time with integer and float products (0: none)",
    )
    ap.add_argument("--skip-transformers", action="store_true", help="only the --palettized/--gguf table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    model, tok, source = catalog.load(args.model)
    if args.skip_transformers:
        compressed_table(Generator(model, tok), args, Console(width=120))
        return
    ref = LlamaForCausalLM.from_pretrained(source.checkpoint, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None
    gen = Generator(model, tok)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    console = Console(width=120)
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
    if args.palettized or args.gguf:
        compressed_table(gen, args, console)


def integer_products(on: bool) -> None:
    from graftlm.quant.linear import PalettizedLinear

    PalettizedLinear.integer_products = on


def llama_cpp_run(path: str, prompt: list[int], threads: int) -> Callable[[int], object]:
    """A run of n greedy tokens after `prompt` with llama.cpp (the model loaded once)."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=len(prompt) + 256, n_threads=threads, verbose=False)

    def run(n: int) -> None:
        llm.reset()
        for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0), 1):
            if i == n:
                break

    return run


def decode_perplexity(model: torch.nn.Module, chunks: list[list[int]]) -> float:
    """Perplexity with every token fed alone through the KV cache, as decoding computes it: the few-row
    products (the integer ones by default) instead of the whole-sequence products perplexity uses."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for seq in chunks:
            cache = KVCache(model.config, 1, len(seq))
            for i in range(len(seq) - 1):
                logits = model(torch.tensor([[seq[i]]]), cache=cache, start=i)[0, -1]
                total += float(torch.log_softmax(logits.float(), -1)[seq[i + 1]].neg())
                count += 1
    return math.exp(total / count)


def compressed_table(gen: Generator, args: argparse.Namespace, console: Console) -> None:
    """Decode tokens/s of the float32 model, each palettized model (integer and float products) and each
    llama.cpp file, at batch 1 (and 8 for graftlm), all in turn within each round."""
    g = torch.Generator().manual_seed(1)
    vocab = gen.model.config.vocab_size
    prompts = torch.randint(100, vocab, (8, 128), generator=g).tolist()
    sides: dict[str, tuple[Callable[[], None], Callable[[int], object], int]] = {}  # label -> (setup, run, batch)
    gens = [("graftlm float32", gen)]
    for path in args.palettized:
        m, t, src = catalog.load(path)
        gens.append((f"graftlm {src.name}", Generator(m, t)))
    for label, gn in gens:
        plain = Generator(gn.model, gn.tokenizer, native=False)
        for batch, g_, how in ((1, gn, ""), (1, plain, ", a forward per step"), (8, gn, "")):
            run = partial(ours_generate, g_, prompts[:batch])
            if label == "graftlm float32":
                sides[f"{label}, batch {batch}{how}"] = (partial(integer_products, True), run, batch)
                continue
            for on, kind in ((True, "integer"), (False, "float")):
                key = f"{label} ({kind} products), batch {batch}{how}"
                sides[key] = (partial(integer_products, on), run, batch)
    for path in args.gguf:
        try:
            run = llama_cpp_run(path, prompts[0], args.threads)
        except ImportError:
            console.print("llama-cpp-python is not installed (pip install -e '.[bench]'): no llama.cpp rows")
            break
        sides[f"llama.cpp {Path(path).name}, batch 1"] = (partial(integer_products, True), run, 1)
    rates: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.repeats):
        for key, (setup, run, batch) in sides.items():
            setup()
            rates[key].append(decode_rate(run, batch, args.new_tokens, 1))
    integer_products(True)
    if args.decode_ppl:
        from palettize import held_out_chunks

        chunks = held_out_chunks(gen.tokenizer, args.decode_ppl)
        ppl = Table(title=f"perplexity, {args.decode_ppl} held-out tokens fed one at a time (the decode path)")
        for col in ("model", "integer products", "float products"):
            ppl.add_column(col, justify="left" if col == "model" else "right")
        for label, gn in gens[1:]:
            row = []
            for on in (True, False):
                integer_products(on)
                row.append(f"{decode_perplexity(gn.model, chunks):.3f}")
            ppl.add_row(label, *row)
        integer_products(True)
        console.print(ppl)
    table = Table(title=f"decode tokens/s, {args.new_tokens} new tokens after 128, medians of {args.repeats} rounds")
    for col in ("model", "tokens/s", "vs graftlm float32 (same batch and step)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for key, r in rates.items():
        batch = sides[key][2]
        suffix = ", a forward per step" if key.endswith(", a forward per step") else ""
        base = statistics.median(rates[f"graftlm float32, batch {batch}{suffix}"])
        table.add_row(key, f"{statistics.median(r):.1f}", f"{statistics.median(r) / base:.2f}x")
    console.print(table)


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
