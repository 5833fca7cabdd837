#!/usr/bin/env bash
# Zero-shot accuracy of SmolLM2-135M-Instruct on the eight datasets, both prompt styles, first N rows.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-200}
SEVEN=boolq,piqa,siqa,arc_easy,arc_challenge,openbookqa,winogrande
for style in paper harness; do
  python evaluate.py --dataset $SEVEN --prompt $style --limit $N --no-progress \
    --out experiments/zero_shot_${style}_seven.json
  # HellaSwag apart: its bundled validation split is lossy (data/datasets/SOURCES.md), and the run says so
  python evaluate.py --dataset hellaswag --prompt $style --limit $N \
    --no-progress --out experiments/zero_shot_${style}_hellaswag.json
done
