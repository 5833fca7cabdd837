#!/usr/bin/env bash
# README's worked example, "Your own task", run in full (RESULTS.md section 7): SmolLM2-135M-Instruct on the 301
# facts of examples/facts (211 train, 90 test), one-target rows (recall/) and 4-way multiple choice (choice/).
# Finished steps are skipped, so the same command continues after an interruption:
#   bash experiments/facts.sh            # every unfinished step (about 1 hour on 2 CPU cores)
# Writes experiments/facts/: circuits (<name>.json + .svg), evaluate.py results (<name>.<what>.json) and
# <method>.training.json and .log.jsonl of the fine-tuning runs (their adapters stay in runs/facts/).
set -euo pipefail
cd "$(dirname "$0")/.."
out=experiments/facts
mkdir -p $out
done_or() { [ -f "$1" ] && return 0; echo "== $1" >&2; return 1; }

# the base model on both schemas; the circuit (D = 64 of the train rows it recalls greedily, a quarter of the
# heads per layer, then one per layer) validated on the test rows against 10 random head sets
for kind in recall choice; do
  done_or $out/$kind.none.json || python evaluate.py --dataset examples/facts/$kind --log-samples --no-progress \
    --out $out/$kind.none.json
done
done_or $out/recall.json || python locate.py --dataset examples/facts/recall --random-trials 10 --no-progress \
  --out $out/recall.json
done_or $out/recall_n1.json || python locate.py --dataset examples/facts/recall --heads-per-layer 1 \
  --random-trials 10 --no-progress --out $out/recall_n1.json
# what masking does to the loss of the targets (validation reports exact match only)
for circuit in recall recall_n1; do
  for what in circuit random1 random2 random3 random4 random5; do
    mask=(--mask $out/$circuit.json); [ $what = circuit ] || mask+=(--random-mask --seed "${what#random}")
    done_or $out/$circuit.$what.json || python evaluate.py --dataset examples/facts/recall "${mask[@]}" \
      --log-samples --no-progress --out $out/$circuit.$what.json
  done
done
# fine-tuning: 190 training rows, 21 held out (10%); 4 epochs (48 steps) with a 10-step warm-up, since the
# protocol's 2 epochs and 100 warm-up steps would end before the learning rate peaks. Adapters go to runs/facts/
# (not committed); their training.json and log.jsonl are copied here.
train=(--epochs 4 --warmup 10 --eval-every 6 --no-progress)
finetune() {  # finetune METHOD [finetune.py options]
  local method=$1; shift
  done_or $out/$method.training.json && return
  python finetune.py "$@" "${train[@]}" --out runs/facts/$method \
    $( [ -f runs/facts/$method/resume/checkpoint.pt ] || [ -f runs/facts/$method/checkpoint.pt ] && echo --resume )
  cp runs/facts/$method/training.json $out/$method.training.json
  cp runs/facts/$method/log.jsonl $out/$method.log.jsonl
}
finetune headmap --heads $out/recall.json
finetune headmap_random --heads $out/recall.json --random-heads
finetune lora --method lora --dataset examples/facts/recall
for method in headmap headmap_random lora; do
  for kind in recall choice; do
    done_or $out/$kind.$method.json || python evaluate.py --dataset examples/facts/$kind --adapter runs/facts/$method \
      --log-samples --no-progress --out $out/$kind.$method.json
  done
done
