"""Serving many adapters: an S-LoRA-style workload scaled to this CPU, against a PEFT user's server loop.

Workload (one fixed seed, the same requests for every configuration): Poisson arrivals at `--rate`
requests/s; each request names adapter i with probability proportional to 1/i (power law, alpha 1);
prompt and output lengths drawn uniformly from `--prompt-len` and `--output-len`. Every request
generates exactly its output length (EOS ignored), greedy.

Configurations: the base model alone; one adapter for all requests; 32, 128 and 1,000 distinct adapters
(the last with an adapter cache that holds only 64); and the 32-adapter requests served the way a PEFT
user would: transformers + PEFT, requests that have arrived grouped by adapter, `load_adapter` on first
use and `set_adapter` per group, each group one `generate` call.

Prints tokens/s, time to first token p50/p99 and per-output-token latency p50/p99, the 32-adapter
throughput against one adapter's and against PEFT's, and the cold load time of a rank-16 adapter on
all seven projections (disk to usable, file dropped from the page cache first).

    python benchmarks/serve.py [--requests 64] [--rate 8] [--threads 2] [--skip-peft] [--only LABEL]

`--ray` instead measures what Ray Serve costs over HTTP: `graftlm serve` against `graftlm serve --ray
--replicas 1` (the replica asks for every CPU), each started alone, the 32-adapter workload sent as
OpenAI completion requests (text prompts, `max_tokens` the output length, greedy) by an async client at
the same arrival times; the servers alternate for `--rounds` rounds and each keeps its best. Prints
completion tokens/s, TTFT-free latency p50/p99 and the Ray/plain throughput ratio (target >= 0.85).

    python benchmarks/serve.py --ray [--rounds 2] [--requests 64] [--rate 8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from graftlm.engine.adapter_cache import Source
from graftlm.engine.engine import Engine, EngineConfig
from graftlm.engine.request import Output
from graftlm.engine.sampling import SamplingParams
from graftlm.loading import catalog
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.config import LoraConfig
from graftlm.lora.model import PEFT_PREFIX
from graftlm.lora.peft_io import CONFIG_FILE, FINGERPRINT_KEY, WEIGHTS_FILE
from graftlm.lora.slots import AdapterSlots
from graftlm.model.modules import module_path, projections

console = Console(soft_wrap=True)


@dataclass
class Req:
    arrival: float
    adapter: int  # 0-based popularity rank; -1 = base
    prompt: list[int]
    output_len: int


@dataclass
class Result:
    tokens_per_s: float
    ttft: list[float]
    tpot: list[float]
    wall: float


def write_adapters(ckpt: Path, n: int, out: Path) -> list[Path]:
    """n rank-16 adapters on all seven projections, random weights, written straight as PEFT files."""
    model, _ = load_checkpoint(ckpt)
    fp = model.fingerprint()
    config = LoraConfig(r=16, alpha=32)
    shapes = {module_path(i, t): tuple(p.weight.shape) for i, t, p in projections(model)}
    stamp = out / "fingerprint"
    if stamp.is_file() and stamp.read_text() == f"{fp}:{n}":
        return [out / f"a{i}" for i in range(n)]
    g = torch.Generator().manual_seed(0)
    paths = []
    with console.status(f"writing {n} adapters to {out}"):
        for i in range(n):
            d = out / f"a{i}"
            d.mkdir(parents=True, exist_ok=True)
            tensors = {}
            for path, (o, in_f) in shapes.items():
                key = f"{PEFT_PREFIX}{path}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(16, in_f, generator=g) * 0.02).bfloat16()
                tensors[f"{key}.lora_B.weight"] = (torch.randn(o, 16, generator=g) * 0.002).bfloat16()
            save_file(tensors, str(d / WEIGHTS_FILE), metadata={"format": "pt", FINGERPRINT_KEY: fp})
            (d / CONFIG_FILE).write_text(json.dumps(config.to_peft("")))
            paths.append(d)
    stamp.write_text(f"{fp}:{n}")
    return paths


def workload(args: argparse.Namespace, vocab: int, n_adapters: int) -> list[Req]:
    rng = np.random.default_rng(args.seed)
    gaps = rng.exponential(1.0 / args.rate, args.requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    if n_adapters > 0:
        p = 1.0 / np.arange(1, n_adapters + 1)
        adapters = rng.choice(n_adapters, size=args.requests, p=p / p.sum())
    else:
        adapters = np.full(args.requests, -1)
    lo, hi = args.prompt_len
    olo, ohi = args.output_len
    return [
        Req(
            float(arrivals[i]),
            int(adapters[i]),
            rng.integers(100, vocab, int(rng.integers(lo, hi + 1))).tolist(),
            int(rng.integers(olo, ohi + 1)),
        )
        for i in range(args.requests)
    ]


def summarize(reqs: list[Req], first: list[float], done: list[float], wall: float) -> Result:
    tokens = sum(r.output_len for r in reqs)
    ttft = [f - r.arrival for r, f in zip(reqs, first, strict=True)]
    tpot = [(d - f) / max(1, r.output_len - 1) for r, f, d in zip(reqs, first, done, strict=True)]
    return Result(tokens / wall, ttft, tpot, wall)


def run_graftlm(
    ckpt: Path, adapters: list[Path], reqs: list[Req], cache_slots: int, args: argparse.Namespace
) -> tuple[Result, Engine]:
    model, tok = load_checkpoint(ckpt)
    mb = cache_slots * AdapterSlots.slot_bytes(model, 16, torch.bfloat16) / 2**20 + 0.5
    config = EngineConfig(
        max_batch=args.max_batch, adapter_cache_mb=mb, max_len=512, prefill_tokens=args.prefill_tokens
    )
    engine = Engine(model, tok, config)
    sources = [Source(p.name, "", p) for p in adapters]
    first = [0.0] * len(reqs)
    done = [0.0] * len(reqs)

    def sink(i: int):
        def put(o: Output) -> None:
            now = time.monotonic() - t0
            if o.error is not None:
                raise SystemExit(f"request {i} failed: {o.error}")
            if first[i] == 0.0:
                first[i] = now
            if o.finish_reason is not None:
                done[i] = now

        return put

    # warm up the model outside the measured window
    warm = engine.submit([100, 101, 102], SamplingParams(max_new_tokens=2))
    engine.run_forever(until=lambda: warm.done)
    t0 = time.monotonic()

    def drive() -> None:  # arrivals on a side thread; the engine runs on the main thread (see run_forever)
        for i, r in enumerate(reqs):
            delay = r.arrival - (time.monotonic() - t0)
            if delay > 0:
                time.sleep(delay)
            params = SamplingParams(max_new_tokens=r.output_len, ignore_eos=True)
            engine.submit(r.prompt, params, [] if r.adapter < 0 else [(sources[r.adapter], 1.0)], sink(i))

    threading.Thread(target=drive, daemon=True).start()
    engine.run_forever(until=lambda: all(done))
    wall = time.monotonic() - t0
    engine.stop()
    return summarize(reqs, first, done, wall), engine


def run_peft(ckpt: Path, adapters: list[Path], reqs: list[Req]) -> Result:
    """A PEFT user's server: whatever has arrived, grouped by adapter, one generate() per group."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    base.generation_config.eos_token_id = None
    peft = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    loaded = {0}
    first = [0.0] * len(reqs)
    done = [0.0] * len(reqs)
    pending = list(range(len(reqs)))
    t0 = time.monotonic()
    while pending:
        now = time.monotonic() - t0
        arrived = [i for i in pending if reqs[i].arrival <= now]
        if not arrived:
            time.sleep(max(0.0, min(reqs[i].arrival for i in pending) - now))
            continue
        groups: dict[int, list[int]] = {}
        for i in arrived:
            groups.setdefault(reqs[i].adapter, []).append(i)
        for a, idx in groups.items():
            if a not in loaded:
                peft.load_adapter(adapters[a], adapter_name=f"a{a}")
                loaded.add(a)
            peft.set_adapter(f"a{a}")
            width = max(len(reqs[i].prompt) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                p = reqs[i].prompt
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            n = max(reqs[i].output_len for i in idx)
            start = time.monotonic() - t0
            with torch.inference_mode():
                peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
            end = time.monotonic() - t0
            for i in idx:  # tokens arrive together at the end of generate(); first token after one step
                first[i] = start + (end - start) / n
                done[i] = end
                pending.remove(i)
    return summarize(reqs, first, done, time.monotonic() - t0)


def cold_load_ms(ckpt: Path, adapters: list[Path], n: int = 20) -> list[float]:
    """Disk to usable for rank-16 all-projection adapters, each dropped from the page cache first, on
    the path a request takes: a miss starts the loader thread, the adapter is usable once it is ready."""
    model, tok = load_checkpoint(ckpt)
    engine = Engine(
        model,
        tok,
        EngineConfig(max_batch=1, adapter_cache_mb=AdapterSlots.slot_bytes(model, 16, torch.bfloat16) / 2**20 + 1),
    )
    times = []
    for p in adapters[-n:]:
        with open(p / WEIGHTS_FILE, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        src = [Source(p.name, "", p)]
        t0 = time.perf_counter()
        assert engine.cache.try_acquire(src, first_try=True) is None  # a miss: the load starts
        engine.cache.entries[p.name].settled.wait(10)
        times.append((time.perf_counter() - t0) * 1000)
        held = engine.cache.try_acquire(src, first_try=False)
        assert held is not None, f"{p.name} did not load"
        engine.cache.release(held)
    engine.stop()
    return times


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def http_workload(url: str, model_names: list[str], texts: list[str], reqs: list[Req]) -> tuple[float, list[float]]:
    """Send every request at its arrival time; (completion tokens/s over the whole run, each latency)."""
    import asyncio

    import httpx

    async def run() -> tuple[float, list[float]]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            t0 = time.monotonic()

            async def one(r: Req, text: str) -> tuple[int, float]:
                await asyncio.sleep(max(0.0, r.arrival - (time.monotonic() - t0)))
                start = time.monotonic()
                body = {"model": model_names[r.adapter], "prompt": text, "max_tokens": r.output_len, "temperature": 0}
                got = await client.post("/v1/completions", json=body)
                got.raise_for_status()
                return got.json()["usage"]["completion_tokens"], time.monotonic() - start

            done = await asyncio.gather(*(one(r, t) for r, t in zip(reqs, texts, strict=True)))
            wall = time.monotonic() - t0
        return sum(n for n, _ in done) / wall, [s for _, s in done]

    return asyncio.run(run())


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"no server at {url} after {timeout_s} s")


def ray_overhead(args: argparse.Namespace, ckpt: Path, vocab: int) -> None:
    from graftlm.loading.checkpoint import load_checkpoint as load
    from graftlm.server.run import free_port

    adapters_dir = args.adapters_dir / "first32"
    if not (adapters_dir / "a31").exists():
        adapters_dir.mkdir(parents=True, exist_ok=True)
        for p in write_adapters(ckpt, 1000, args.adapters_dir)[:32]:
            (adapters_dir / p.name).symlink_to(p)
    reqs = workload(args, vocab, 32)
    tok = load(ckpt)[1]
    texts = [tok.decode(r.prompt) for r in reqs]
    names = [f"a{i}" for i in range(32)]
    graftlm = [sys.executable, "-m", "graftlm.cli.main", "serve", "-m", args.model, "--adapters", str(adapters_dir)]
    sides = {
        "plain": [*graftlm, "--max-batch", str(args.max_batch)],
        "ray, 1 replica": [*graftlm, "--max-batch", str(args.max_batch), "--ray", "--replica-cpus", "2"],
    }
    best: dict[str, tuple[float, list[float]]] = {}
    rounds: list[dict[str, float]] = []
    for _ in range(args.rounds):
        rounds.append({})
        for label, cmd in sides.items():
            port = free_port()
            env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
            proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=subprocess.DEVNULL)
            try:
                url = f"http://127.0.0.1:{port}"
                wait_ready(url, proc)
                http_workload(url, names, texts[:4], reqs[:4])  # warm-up: the model and the first adapters
                got = http_workload(url, names, texts, reqs)
                console.print(f"{label}: {got[0]:.1f} completion tokens/s")
                rounds[-1][label] = got[0]
                if label not in best or got[0] > best[label][0]:
                    best[label] = got
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    table = Table(title=f"{args.requests} requests over 32 adapters, Poisson {args.rate}/s, over HTTP")
    for col in ("server", "tokens/s", "latency p50 s", "latency p99 s"):
        table.add_column(col, justify="right")
    for label, (tps, lat) in best.items():
        table.add_row(label, f"{tps:.1f}", f"{pct(lat, 50):.2f}", f"{pct(lat, 99):.2f}")
    console.print(table)
    ratio = best["ray, 1 replica"][0] / best["plain"][0]
    pairs = [r["ray, 1 replica"] / r["plain"] for r in rounds]
    each = ", ".join(f"{p:.2f}x" for p in pairs)
    console.print(f"each round's pair: {each} (median {statistics.median(pairs):.2f}x)")
    console.print(f"Ray Serve, 1 replica / plain server throughput: {ratio:.2f}x (target >= 0.85x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=catalog.DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=8.0, help="Poisson arrival rate, requests/s")
    # S-LoRA draws prompt and output lengths from the same range, [8, 512]; scaled down 8x for this CPU
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(8, 64))
    ap.add_argument("--output-len", type=int, nargs=2, default=(8, 64))
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=EngineConfig().prefill_tokens)
    ap.add_argument("--only", default=None, help="run only the configurations whose label contains this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapters-dir", type=Path, default=Path(tempfile.gettempdir()) / "graftlm-bench-adapters")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--ray", action="store_true", help="the plain server against one Ray Serve replica, over HTTP")
    ap.add_argument("--rounds", type=int, default=2, help="--ray: alternating rounds per side")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = catalog.resolve(args.model).checkpoint
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    if args.ray:
        ray_overhead(args, ckpt, vocab)
        return
    adapters = write_adapters(ckpt, 1000, args.adapters_dir)

    configs = [
        ("base model only", 0, 1, 64),
        ("1 adapter", 1, 1, 64),
        ("32 adapters", 32, 32, 64),
        ("128 adapters", 128, 128, 64),
        ("1,000 adapters, cache of 64", 1000, 1000, 64),
    ]
    results: dict[str, Result] = {}
    for label, n, _, slots in configs:
        if args.only and args.only not in label:
            continue
        reqs = workload(args, vocab, n)
        with console.status(f"graftlm: {label}"):
            results[label], engine = run_graftlm(ckpt, adapters, reqs, slots, args)
        loads = sum(s.loads for s in engine.cache.stats.values())
        console.print(
            f"{label}: {results[label].tokens_per_s:.1f} tok/s, {loads} adapter loads; decode "
            f"{engine.decode_seconds:.1f} s over {engine.decode_steps} steps (mean batch "
            f"{engine.decode_rows / max(1, engine.decode_steps):.1f}), prefill {engine.prefill_seconds:.1f} s "
            f"for {engine.prefill_tokens} tokens"
        )
    if not args.skip_peft and not args.only:
        with console.status("PEFT: 32 adapters"):
            results["PEFT, 32 adapters"] = run_peft(ckpt, adapters, workload(args, vocab, 32))
    cold = cold_load_ms(ckpt, adapters) if not args.only else []

    table = Table(
        title=(
            f"{args.requests} requests, Poisson {args.rate}/s, prompt {args.prompt_len[0]}-{args.prompt_len[1]}, "
            f"output {args.output_len[0]}-{args.output_len[1]} tokens, max batch {args.max_batch}, "
            f"{args.threads} threads"
        )
    )
    for col in ("configuration", "tokens/s", "TTFT p50 s", "TTFT p99 s", "per token p50 ms", "per token p99 ms"):
        table.add_column(col, justify="right")
    for label, r in results.items():
        table.add_row(
            label,
            f"{r.tokens_per_s:.1f}",
            f"{pct(r.ttft, 50):.2f}",
            f"{pct(r.ttft, 99):.2f}",
            f"{pct(r.tpot, 50) * 1000:.0f}",
            f"{pct(r.tpot, 99) * 1000:.0f}",
        )
    console.print(table)
    if "32 adapters" not in results or "1 adapter" not in results:
        return
    t32, t1 = results["32 adapters"].tokens_per_s, results["1 adapter"].tokens_per_s
    console.print(f"32 adapters / 1 adapter throughput: {t32 / t1:.2f}x (target >= 0.8x)")
    if "PEFT, 32 adapters" in results:
        console.print(f"graftlm / PEFT throughput, 32 adapters: {t32 / results['PEFT, 32 adapters'].tokens_per_s:.2f}x")
    if not cold:
        return
    console.print(
        f"cold load, rank 16 on all projections (disk to usable, {len(cold)} adapters): "
        f"median {statistics.median(cold):.1f} ms, max {max(cold):.1f} ms (target < 20 ms)"
    )


if __name__ == "__main__":
    main()
