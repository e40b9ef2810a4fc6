#!/usr/bin/env bash
# Post-training on the follow task, end to end (about an hour on 2 cores): rejection-sampled SFT data
# from the base model, an SFT adapter, RL from it, and one graded evaluation of all three on the held-out
# test prompts (README, "Post-training"). Usage: examples/follow/post_train.sh [WORKDIR] (default runs/follow)
set -euo pipefail
W=${1:-runs/follow}
G=${GRAFTLM:-.venv/bin/graftlm}
mkdir -p "$W"
$G synth --prompts examples/follow/prompts.jsonl --teacher base --grader instructions --k 4 \
    --max-new-tokens 96 --out "$W/synth.jsonl"
$G train --data "$W/synth.jsonl" --out "$W/sft" --epochs 2
$G rl --prompts examples/follow/prompts.jsonl --reward instructions --init-from "$W/sft" --out "$W/rl" \
    --steps 50 --batch 8 --k 4 --lr 1e-4 --max-new-tokens 96
$G eval --data examples/follow/test.jsonl --adapter "$W/sft" --adapter "$W/rl" -o "$W/eval.json"
$G eval --data examples/instructions/test.jsonl --adapter "$W/sft" --adapter "$W/rl" -o "$W/eval-instructions.json"
