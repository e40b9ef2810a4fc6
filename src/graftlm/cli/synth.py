"""`graftlm synth`: training JSONL by rejection sampling from teachers, graded like `graftlm eval`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from graftlm.cli.fields import add_fields, build
from graftlm.cli.options import add_model, add_placement, placement_from
from graftlm.eval.judge import JudgeConfig
from graftlm.eval.rewards import Reward
from graftlm.recipes.synth import SynthConfig, Teacher, synthesize


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="make training data: teachers answer prompts, graders keep the best passing answer",
        description=(
            "Rejection sampling: every teacher proposes --k answers to each prompt, the --grader scores them, and "
            "the best answer that passes becomes a chat line of --out (prompts with no passing answer are left "
            "out). Writes OUT (JSONL for `graftlm train`) and OUT.report.json (pass rates per teacher). A stopped "
            "run started again with the same settings continues where it stopped (OUT.progress.jsonl)."
        ),
    )
    p.add_argument("--prompts", type=Path, required=True, help="JSONL prompts ('prompt' or 'messages', plus fields)")
    p.add_argument("--out", type=Path, required=True, help="training JSONL to write")
    p.add_argument(
        "--teacher",
        action="append",
        default=[],
        metavar="T",
        help="who answers (repeatable): base (the model), an adapter folder, or URL#MODEL for an OpenAI-compatible "
        "endpoint (key from $GRAFTLM_TEACHER_KEY); default: base",
    )
    p.add_argument(
        "--grader",
        default="instructions",
        metavar="SPEC",
        help="what passes, as a reward spec (see `graftlm rl --help`): every term must pass (default: instructions)",
    )
    p.add_argument(
        "--min-score", type=float, default=0.5, help="score a grader without labels must reach to pass (default: 0.5)"
    )
    add_model(p, runtime=False)
    add_placement(p)
    add_fields(p.add_argument_group("sampling"), SynthConfig)
    add_fields(p.add_argument_group("judge (for a rubric grader)"), JudgeConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    judge = (
        build(JudgeConfig, args, api_key=args.judge_key or os.environ.get("GRAFTLM_JUDGE_KEY", ""))
        if args.judge_url
        else None
    )
    reward = Reward.parse(args.grader, judge, args.min_score)
    teachers = [Teacher.parse(t) for t in args.teacher or ["base"]]
    synthesize(args.model, args.prompts, teachers, reward, args.out, build(SynthConfig, args), placement_from(args))
    return 0
