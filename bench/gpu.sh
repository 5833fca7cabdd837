#!/usr/bin/env bash
# Every GPU claim in one device call (about 8 minutes on an H100 or H200): the kernel's exactness, the kernel against
# SDPA (flash, cuDNN) and FlexAttention at every masked share, a 7B training step against PEFT + Trainer (and with
# --activation-checkpointing beside it), locate's
# MFU at 7B, HeadMap's step profiled against LoRA's, evaluate against lm-eval's HF backend at 7B, --fsdp's
# locate and training step sharded over the machine's GPUs; then
# bench/gpu_claims.py's table.
#
#   bash bench/gpu.sh                # on the GPU: raw figures in $OUT (or bench/results/raw), claims in bench/results/gpu.json
#   bash bench/gpu.sh --dry-run      # on a CPU: the same scripts on tiny shapes (CI runs it)
#   python bench/gpu_claims.py DIR --out bench/results/gpu.json   # again here, with the raw figures fetched: adds
#                                                                  # protocol_gpu_hours (needs SmolLM2's tokenizer)
set -euo pipefail
cd "$(dirname "$0")/.."
dry=()
[ "${1:-}" = --dry-run ] && dry=(--dry-run)
raw="${RAW:-${OUT:-bench/results/raw}}"
claims="${CLAIMS:-bench/results/gpu.json}"
mkdir -p "$raw"
# the dry run checks every path, so it needs every reference the claims are timed against: one line if one is
# missing (on a GPU a section without its reference records the error, and the others still run)
[ ${#dry[@]} -eq 0 ] || python bench/needs.py peft lm_eval accelerate
export PYTHONUNBUFFERED=1
step() { echo "== $* ($SECONDS s in)"; }
step kernel exactness, then the kernel against SDPA and FlexAttention
python bench/gpu.py "${dry[@]}" --grid claims --budget 130 --out "$raw/kernel.json" --overwrite \
  || echo "kernel checks FAILED: see $raw/kernel.json (the claims record them)"
step 7B training step and locate
python bench/gpu_scale.py "${dry[@]}" --sections locate_7b_arc,finetune_7b --budget 180 --out "$raw/scale.json" \
  --overwrite || true  # a failed section is recorded in the file; the claims say which
step where a HeadMap step goes against a LoRA step
python bench/step_profile.py "${dry[@]}" --shape llama2-7b --out "$raw/step_profile.json" --overwrite || true
step evaluate against lm-eval
python bench/evaluate_vs_lm_eval.py "${dry[@]}" --out "$raw/evaluate.json" --overwrite || true
step "--fsdp: locate and HeadMap steps sharded over this machine's GPUs (NCCL; the dry run: 2 CPU processes, gloo)"
gpus=2
[ ${#dry[@]} -gt 0 ] || gpus=$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')
python -m torch.distributed.run --standalone --nproc_per_node "$gpus" bench/fsdp_step.py "${dry[@]}" \
  --out "$raw/fsdp.json" --overwrite || true
step claims
python bench/gpu_claims.py "$raw" --out "$claims"
