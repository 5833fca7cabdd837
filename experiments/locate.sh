#!/usr/bin/env bash
# Knowledge circuits of SmolLM2-135M-Instruct (harness prompts), one dataset per call, each well under an hour
# on 2 CPU cores:   bash experiments/locate.sh arc_easy   (then piqa, hellaswag)
# Writes experiments/circuits/<dataset>.json (circuit, loss matrix, validation) and .svg (heat map).
# Interrupted? Run the same command again: it resumes from the last finished layer.
set -euo pipefail
cd "$(dirname "$0")/.."
dataset=$1
split=train; pool=1000; samples=32; val_rows=400
# HellaSwag's rows are about 4x longer, so fewer of them keep the run near 35 minutes
if [ "$dataset" = hellaswag ]; then
  pool=200; samples=16; val_rows=160
fi
python locate.py --dataset "$dataset" --prompt harness --split $split --pool $pool --samples $samples \
  --validate-limit $val_rows --random-trials 5 --seed 0 \
  --out experiments/circuits/$dataset.json --resume
