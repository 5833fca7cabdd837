#!/usr/bin/env bash
# Fine-tuning on one dataset (paper prompts, a fixed budget of 20 steps at batch 16 = 320 training texts):
# HeadMap MHA and HS on the located circuit, HeadMap MHA on random heads, LoRA and DoRA.
#   bash experiments/finetune.sh arc_easy     (needs experiments/circuits/arc_easy.json; then piqa)
# About 25 min per dataset on 2 CPU cores; each run resumes if interrupted. Adapters go to runs/experiments/
# (large, not committed); their training.json and log.jsonl are copied to experiments/finetune/.
set -euo pipefail
cd "$(dirname "$0")/.."
dataset=$1
BUDGET="--prompt paper --max-steps 20 --warmup 2 --eval-every 10 --val-limit 64 --eval-limit 200 --seed 0"
mkdir -p experiments/finetune
run() {  # name, then finetune.py arguments
  local name=$1; shift
  local out=runs/experiments/${dataset}_$name
  [ -f experiments/finetune/${dataset}_$name.json ] && return  # done already
  python finetune.py --dataset "$dataset" $BUDGET --out "$out" "$@" \
    $( [ -f "$out/resume/checkpoint.pt" ] || [ -f "$out/checkpoint.pt" ] && echo --resume )
  cp "$out/log.jsonl" experiments/finetune/${dataset}_$name.log.jsonl
  cp "$out/training.json" experiments/finetune/${dataset}_$name.json
}
heads=experiments/circuits/$dataset.json
run headmap_mha --heads $heads --method headmap --variant mha
run headmap_hs --heads $heads --method headmap --variant hs
run headmap_random --heads $heads --method headmap --variant mha --random-heads
# (PIQA's longest texts once pushed a LoRA/DoRA step of 16 padded rows past 24 GiB; --token-budget now bounds it)
run lora --method lora
run dora --method dora
