"""`graftlm rl`: reinforcement learning of a LoRA adapter on prompts, rewarded by graders."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from graftlm.cli.fields import add_fields, build
from graftlm.cli.options import add_model, add_placement, placement_from
from graftlm.eval.judge import JudgeConfig
from graftlm.eval.rewards import Reward
from graftlm.lora.config import LoraConfig
from graftlm.recipes.rl import RLConfig, train_rl


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rl",
        help="train a LoRA adapter by reinforcement learning (RLOO or MDLOO) on rewarded prompts",
        description=(
            "On-policy RL of a LoRA adapter: each step samples k answers to a batch of prompts through the "
            "serving engine, scores them with the reward, and moves the adapter by the leave-one-out policy "
            "gradient with a KL penalty to the reference. Each --prompts line has 'prompt' (or chat 'messages') "
            "and whatever the reward reads ('checks' for instructions, 'completion' for a metric). The output "
            "is a normal adapter folder plus rl.json (config, reward, per-step reward, KL, length, pass rate)."
        ),
    )
    p.add_argument("--prompts", type=Path, required=True, help="JSONL prompts to train on")
    p.add_argument(
        "--reward",
        required=True,
        metavar="SPEC",
        help="instructions | rouge_l | exact_match | json_field_f1 | rubric | module:function, or a weighted sum "
        "such as 0.8*instructions+0.2*mymod:brevity",
    )
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    add_model(p, runtime=False)
    add_placement(p)
    p.add_argument(
        "--init-from", type=Path, default=None, metavar="ADAPTER", help="start from this adapter (e.g. an SFT one)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this --out")
    p.add_argument(
        "--storage-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="saved weights' dtype"
    )
    add_fields(p.add_argument_group("rl"), RLConfig)
    add_fields(p.add_argument_group("adapter (from zero)"), LoraConfig, ("r", "targets", "layers", "use_rslora"))
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    add_fields(p.add_argument_group("judge (for a rubric reward)"), JudgeConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    key = args.judge_key or os.environ.get("GRAFTLM_JUDGE_KEY", "")
    judge = build(JudgeConfig, args, api_key=key) if args.judge_url else None
    reward = Reward.parse(args.reward, judge)
    lora = build(LoraConfig, args, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank)
    config = build(RLConfig, args)
    train_rl(
        args.model,
        args.prompts,
        reward,
        config,
        args.out,
        lora,
        args.init_from,
        args.resume,
        args.storage_dtype,
        placement_from(args),
    )
    return 0
