#!/usr/bin/env bash
# The three example tasks post-trained (about 35 minutes on 2 cores): each task's SFT adapter (the
# demo's quick schedule), RL from it rewarded by the task's own metric against the reference answers of
# its training lines, and one evaluation of both on the task's test split, so the README can show that
# post-training keeps (or lifts) the metric the task is judged by.
# Usage: examples/post_train_tasks.sh [WORKDIR] (default runs/tasks)
set -euo pipefail
W=${1:-runs/tasks}
G=${GRAFTLM:-.venv/bin/graftlm}
declare -A METRIC=([summarize]=rouge_l [proofread]=exact_match [extract]=json_field_f1)
declare -A TOKENS=([summarize]=32 [proofread]=64 [extract]=64)
for t in summarize proofread extract; do
    mkdir -p "$W/$t"
    [ -f "$W/$t/sft/training.json" ] ||
        $G train --data "examples/$t/train.jsonl" --valid "examples/$t/valid.jsonl" --out "$W/$t/sft" \
            --lr 1e-3 --batch 8 --max-steps 24 --eval-every 0
    [ -f "$W/$t/rl/rl.json" ] ||
        $G rl --prompts "examples/$t/train.jsonl" --reward "${METRIC[$t]}" --init-from "$W/$t/sft" \
            --out "$W/$t/rl" --steps 20 --batch 8 --k 4 --max-new-tokens "${TOKENS[$t]}"
    $G eval --data "examples/$t/test.jsonl" --adapter "$W/$t/sft" --adapter "$W/$t/rl" --no-base \
        --limit 100 -o "$W/$t/eval.json"
done
