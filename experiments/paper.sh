#!/usr/bin/env bash
# The paper's whole protocol for one model, on GPUs: circuits of the 8 datasets, then HeadMap, HeadMap on random
# heads, LoRA and DoRA fine-tuned and evaluated on each. Resumable: run the same command again.
#   bash experiments/paper.sh --model meta-llama/Llama-2-7b-hf --plan      # steps, sizes, time estimate
#   bash experiments/paper.sh --model meta-llama/Llama-2-7b-hf --gpus 8    # run them (torchrun when --gpus > 1)
# bash experiments/paper.sh --help lists the options (limits for a smoke test among them).
exec python3 "$(dirname "$0")/paper.py" "$@"
