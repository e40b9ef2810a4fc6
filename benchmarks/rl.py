"""The RL loop's speed on 2 cores: tokens sampled per second and optimizer steps per minute of `graftlm rl`,
and its sampler against the usual peer's.

1. Sampling alone, one RL step's worth (`--batch` prompts x `--k` answers, temperature 1, at most
   `--max-new-tokens`): graftlm's serving engine with the policy adapter (the path `graftlm rl` samples
   through) against transformers' `generate` on the PEFT model of the same adapter (what TRL's trainers
   use when vLLM is not there), same prompts, same threads, alternating sides, best of `--rounds`.
   Tokens/s counts answer tokens up to and including the stop token.
2. The whole loop: `train_rl` for `--steps` steps on the prompts with the `instructions` reward, as
   `graftlm rl` runs it; sampled tokens/s, seconds per update, optimizer steps per minute.

    python benchmarks/rl.py [--prompts examples/follow/prompts.jsonl] [--steps 4] [--batch 8] [--k 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from graftlm.engine.adapter_finder import Source
from graftlm.engine.offline import Job, run_jobs
from graftlm.engine.sampling import SamplingParams
from graftlm.eval.rewards import Reward
from graftlm.eval.runner import load_cases
from graftlm.loading import catalog
from graftlm.lora.config import LoraConfig
from graftlm.lora.model import add_lora, lora_layers, lora_state_dict
from graftlm.lora.peft_io import save_adapter
from graftlm.recipes.rl import RLConfig, sampler_engine, train_rl


def random_adapter(model_name: str, out: Path) -> None:
    """A rank-16 adapter with small random B (a policy some way from the base)."""
    model, _, _ = catalog.load(model_name)
    torch.manual_seed(0)
    add_lora(model, LoraConfig())
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0, 0.002)
    save_adapter(out, LoraConfig(), lora_state_dict(model), model.fingerprint(), "float32")


def ours(model_name: str, adapter: Path, prompts: list[list[int]], args: argparse.Namespace):  # type: ignore[no-untyped-def]
    model, tok, _ = catalog.load(model_name)
    config = RLConfig(batch=args.batch, k=args.k, max_new_tokens=args.max_new_tokens)
    engine = sampler_engine(model, tok, config, max(map(len, prompts)), 16)
    src = ((Source("policy", "", adapter), 1.0),)

    def run(seed: int) -> int:
        jobs = [
            Job(p, SamplingParams(args.max_new_tokens, 1.0, seed=seed + i * args.k + j), src)
            for i, p in enumerate(prompts)
            for j in range(args.k)
        ]
        return sum(len(f.token_ids) for f in run_jobs(engine, jobs, "graftlm samples"))

    return run, engine


def theirs(model_name: str, adapter: Path, prompts: list[list[int]], args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    _, tok, source = catalog.load(model_name)
    base = LlamaForCausalLM.from_pretrained(source.checkpoint, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    width = max(map(len, prompts))
    rows = [p for p in prompts for _ in range(args.k)]
    ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in rows])  # left-padded, as generate wants
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    eos = sorted(tok.stop_ids(base.config.eos_token_id if isinstance(base.config.eos_token_id, list) else []))

    def run(seed: int) -> int:
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=tok.pad_id,
            )  # fmt: skip
        new = out[:, width:]
        count = 0
        for row in new.tolist():
            for t in row:
                count += 1
                if t in eos:
                    break
        return count

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=catalog.DEFAULT_MODEL)
    ap.add_argument("--prompts", type=Path, default=Path("examples/follow/prompts.jsonl"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="steps of the whole loop (0: sampling only)")
    ap.add_argument("--skip-peer", action="store_true", help="no transformers + PEFT sampling")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=120)
    cases = load_cases(args.prompts, need_reference=False)
    _, tok, _ = catalog.load(args.model)
    prompts = [tok.encode_chat(c.messages) for c in cases[: args.batch]]
    table = Table(
        title=f"RL on {args.threads} threads: {args.batch} prompts x {args.k} answers, <= {args.max_new_tokens} tokens"
    )
    for col in ("measure", "graftlm", "transformers + PEFT", "ratio"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "policy"
        random_adapter(args.model, adapter)
        ours_run, engine = ours(args.model, adapter, prompts, args)
        ours_run(0)  # warm up: the adapter loads, buffers are made
        peer_run = None if args.skip_peer else theirs(args.model, adapter, prompts, args)
        best = {"graftlm": 0.0, "peer": 0.0}
        for r in range(args.rounds):
            for side, run in (("graftlm", ours_run), ("peer", peer_run)):
                if run is None:
                    continue
                t0 = time.perf_counter()
                n = run(1000 * (r + 1))
                best[side] = max(best[side], n / (time.perf_counter() - t0))
                console.print(f"round {r + 1}: {side} {n} tokens, {best[side]:.0f} tok/s best so far")
        engine.stop()
        peer = best["peer"] or float("nan")
        table.add_row("sampling tokens/s", f"{best['graftlm']:.0f}", f"{peer:.0f}", f"{best['graftlm'] / peer:.2f}x")
        if args.steps:
            config = RLConfig(
                batch=args.batch, k=args.k, max_new_tokens=args.max_new_tokens, steps=args.steps, save_every=0
            )
            t0 = time.perf_counter()
            result = train_rl(args.model, args.prompts, Reward.parse("instructions"), config, Path(tmp) / "rl")
            seconds = time.perf_counter() - t0
            h = result.history
            sampled = sum(x["tokens"] for x in h) / sum(x["sample_seconds"] for x in h)
            update = sum(x["update_seconds"] for x in h) / len(h)
            table.add_row("loop: sampled tokens/s", f"{sampled:.0f}", "", "")
            table.add_row("loop: seconds per update", f"{update:.1f}", "", "")
            table.add_row("loop: optimizer steps/min", f"{60 * result.steps / seconds:.2f}", "", "")
    console.print(table)


if __name__ == "__main__":
    main()
