"""The GPU comparisons of issue 34 in one run: decode, serving over many adapters, and a training step,
each against transformers / PEFT on the same device, on random weights built here (nothing downloaded).

Shapes: `135m` (SmolLM2-135M's: 30 layers, hidden 576, vocab 49152), `1b` (Llama-3.2-1B's: 16 layers,
hidden 2048, GQA 32/8, vocab 128256) and `tiny` (for a dry run on the CPU). Timings synchronise the
device around every timed region. Sides alternate (graftlm, peer, graftlm, peer) and each side's best
round counts: these hosts drift.

    python benchmarks/gpu.py --device cuda                 # the whole run, about 5 minutes on an H100/H200
    python benchmarks/gpu.py --device cpu --tiny           # dry run of every part on the CPU, under a minute

Parts (`--parts`, default all):
  decode   greedy decode tokens/s at batch 1 and 32, graftlm's Generator vs transformers' generate,
           on the 135m and 1b shapes (the target: 1b batch 32 at least 1.0x transformers)
  serve    the serving engine on 64 requests spread over 32 adapters (rank 16, all seven projections)
           vs the same 64 requests on one adapter (the target: at least 0.8x), 135m shape
  train    a LoRA training step (rank 16, all projections, batch 8 x 256 tokens) vs PEFT on
           transformers (the target: at least 1.0x), 135m shape
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from multi_lora import make_adapters  # the same 32 random rank-16 adapters (benchmarks/ is on the path)
from rich.console import Console
from rich.table import Table

from graftlm.engine.engine import Engine, EngineConfig
from graftlm.engine.generate import Generator
from graftlm.engine.offline import Job, run_jobs
from graftlm.engine.sampling import SamplingParams
from graftlm.loading.checkpoint import load_checkpoint
from graftlm.lora.config import LoraConfig
from graftlm.train.data import Batch
from graftlm.train.losses import completion_loss
from graftlm.train.trainer import TrainConfig, Trainer

SHAPES: dict[str, dict[str, object]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    },
    "135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
}
COMMON = {"max_position_embeddings": 2048, "rope_theta": 100000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EOS = 2


def write_random_checkpoint(out: Path, shape: str) -> Path:
    """A random Llama of `shape` with a word-level tokenizer over its whole vocabulary ("t0" ... "tN")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {**SHAPES[shape], **COMMON, "bos_token_id": 1, "eos_token_id": EOS}
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(out, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(int(cfg["vocab_size"]))}  # type: ignore[call-overload]
    vocab.update({"<s>": 1, "</s>": EOS})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def alternate(ours: Callable[[], float], peer: Callable[[], float], rounds: int) -> tuple[float, float]:
    """Each side's best rate over `rounds` alternating runs (after one warm-up each)."""
    ours(), peer()
    a, b = [], []
    for _ in range(rounds):
        a.append(ours())
        b.append(peer())
    return max(a), max(b)


def prompts_for(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


# ---- decode ------------------------------------------------------------------------------------------
def ours_decode(gen: Generator, prompts: torch.Tensor, n: int, device: str) -> float:
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    return prompts.shape[0] * n / timed(lambda: gen.generate(prompts.tolist(), params), device)


def peer_decode(ref: torch.nn.Module, prompts: torch.Tensor, n: int, device: str) -> float:
    ids = prompts.to(device)

    def run() -> None:
        with torch.inference_mode():
            ref.generate(  # type: ignore[operator]
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
            )

    return prompts.shape[0] * n / timed(run, device)


def decode_part(ckpt: Path, shape: str, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    from transformers import LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    model, tok = load_checkpoint(ckpt, dtype, args.device)
    gen = Generator(model, tok)
    ref = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(args.device).eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    rows = []
    for batch in (1, 32):
        prompts = prompts_for(int(SHAPES[shape]["vocab_size"]), batch, args.prompt_len)  # type: ignore[call-overload]
        a, b = alternate(
            partial(ours_decode, gen, prompts, args.new_tokens, args.device),
            partial(peer_decode, ref, prompts, args.new_tokens, args.device),
            args.rounds,
        )
        rows.append((f"decode {shape} batch {batch} (tokens/s)", a, b))
    del ref, gen, model
    return rows


# ---- serving over many adapters ----------------------------------------------------------------------
def serve_part(ckpt: Path, shape: str, args: argparse.Namespace, work: Path) -> list[tuple[str, float, float]]:
    names = [p.name for p in make_adapters(ckpt, 32, work / "adapters")]
    model, tok = load_checkpoint(ckpt, getattr(torch, args.dtype), args.device)
    vocab = int(SHAPES[shape]["vocab_size"])  # type: ignore[call-overload]
    config = EngineConfig(max_batch=64, max_len=args.prompt_len + args.new_tokens + 8, prefix_cache_mb=0.0)
    engine = Engine(model, tok, config, work / "adapters")
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    prompts = prompts_for(vocab, 64, args.prompt_len, seed=1).tolist()

    def throughput(spread: int) -> float:
        jobs = [Job(p, params, ((engine.cache.resolve(names[i % spread]), 1.0),)) for i, p in enumerate(prompts)]
        wall = timed(lambda: run_jobs(engine, jobs, "serving"), args.device)
        return len(jobs) * args.new_tokens / wall

    many, one = alternate(lambda: throughput(32), lambda: throughput(1), args.rounds)
    engine.stop()
    return [(f"serve {shape}: 64 requests, 32 adapters vs 1 adapter (tokens/s)", many, one)]


# ---- a training step ---------------------------------------------------------------------------------
def train_batch(vocab: int, batch: int, length: int, device: str) -> Batch:
    tokens = prompts_for(vocab, batch, length, seed=2).to(device)
    targets = torch.zeros_like(tokens, dtype=torch.bool)
    targets[:, length // 2 :] = True
    return Batch(tokens=tokens, targets=targets, n_tokens=tokens.numel())


def train_part(ckpt: Path, shape: str, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    vocab = int(SHAPES[shape]["vocab_size"])  # type: ignore[call-overload]
    b = train_batch(vocab, 8, args.train_len, args.device)
    model, _ = load_checkpoint(ckpt, torch.float32, args.device)
    trainer = Trainer(model, LoraConfig(r=16, alpha=32), TrainConfig(lr=1e-4), pad_id=0)
    model.train()
    base = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")
    peft = get_peft_model(base, PeftConfig(r=16, lora_alpha=32, target_modules=TARGETS)).to(args.device)
    peft.train()
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    labels = b.tokens.masked_fill(~b.targets, -100)

    def ours() -> float:
        def step() -> None:
            loss, n = completion_loss(model, b)
            (loss / n).backward()
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        return b.n_tokens * args.train_steps / timed(lambda: [step() for _ in range(args.train_steps)], args.device)

    def peer() -> float:
        def step() -> None:
            peft(input_ids=b.tokens, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return b.n_tokens * args.train_steps / timed(lambda: [step() for _ in range(args.train_steps)], args.device)

    a, p = alternate(ours, peer, args.rounds)
    return [(f"train {shape}: batch 8 x {args.train_len} (tokens/s)", a, p)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="decode/serve")
    ap.add_argument("--tiny", action="store_true", help="the tiny shape everywhere, few tokens: a dry run")
    ap.add_argument("--parts", default="decode,serve,train")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.tiny:
        args.new_tokens, args.prompt_len, args.train_len, args.train_steps = 8, 16, 32, 2
    parts = set(args.parts.split(","))
    console = Console()
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    console.print(f"device {args.device} ({where}), torch {torch.__version__}, {args.dtype}")
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shapes = ["tiny"] if args.tiny else ["135m", "1b"]
        ckpts = {s: write_random_checkpoint(work / s, s) for s in shapes}
        small = "tiny" if args.tiny else "135m"
        if "decode" in parts:
            for s in shapes:
                rows += decode_part(ckpts[s], s, args)
                console.print(rows[-1])
        if "serve" in parts:
            rows += serve_part(ckpts[small], small, args, work)
            console.print(rows[-1])
        if "train" in parts:
            rows += train_part(ckpts[small], small, args)
            console.print(rows[-1])
    table = Table(title=f"graftlm vs peer on {where} ({args.device})")
    for col in ("measure", "graftlm", "peer", "ratio"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for name, a, b in rows:
        table.add_row(name, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}x")
    console.print(table)
    console.print("peers: transformers generate (decode), the same engine on one adapter (serve), PEFT (train)")
    if args.json:
        args.json.write_text(json.dumps([{"measure": n, "graftlm": a, "peer": b} for n, a, b in rows], indent=1))


if __name__ == "__main__":
    main()
