#!/usr/bin/env bash
# Zero-shot accuracy of SmolLM2-135M-Instruct on the eight datasets, both prompt styles, first N rows.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-200}
DATA=${HEADMAP_DATA_DIR:-../shared/datasets}
SEVEN=boolq,piqa,siqa,arc_easy,arc_challenge,openbookqa,winogrande
for style in paper harness; do
  python evaluate.py --dataset $SEVEN --prompt $style --limit $N --data-dir $DATA --no-progress \
    --out experiments/zero_shot_${style}_seven.json
  # the offline HellaSwag copy names its validation split validation_lossy (see shared/datasets/SOURCES.md)
  python evaluate.py --dataset hellaswag --split validation_lossy --prompt $style --limit $N --data-dir $DATA \
    --no-progress --out experiments/zero_shot_${style}_hellaswag.json
done
