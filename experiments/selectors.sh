#!/usr/bin/env bash
# Which heads? The paper's layer-conditioned search against the selectors researchers use instead (RESULTS.md
# section 8), on SmolLM2-135M-Instruct: one step per call, each well under an hour on 2 CPU cores; finished steps are
# skipped and an interrupted one resumes:
#   bash experiments/selectors.sh          # the next unfinished step
#   bash experiments/selectors.sh all      # every unfinished step, in order
#   bash experiments/selectors.sh list     # every step, done or not
# The conditioned circuits, the unmasked scores and the random-head controls are section 6's and 7's (reused, not run
# again): every selector here takes the same D (locate.py --samples-from) and the same n, so random heads of the
# circuit's per-layer counts are one control for all. The probes read the pool's gold and wrong answers (facts: the
# 4-way choice rows of the same facts), and their heads are masked on the same rows as the others'. Writes experiments/selectors/<task>.<selector>.json (the
# circuit, its score matrix and selection seconds), <task>.<selector>.circuit.json (evaluate.py with its heads
# masked), <task>.<probe|lofit>.global.json and .global.circuit.json (their own global pick, masked) and
# finetune/<task>_<method>_s<seed>.json + .log.jsonl (training.json and log of the short fine-tuning
# budget; the adapters stay in runs/selectors/). experiments/report.py prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
out=experiments/selectors
SELECTORS="independent attribution probe lofit random"
ROWS=500  # evaluation rows of the commonsense tasks (section 6's)
declare -A CIRCUIT=([arc_easy]=experiments/locating/smollm2/arc_easy.json [piqa]=experiments/locating/smollm2/piqa.json
                    [hellaswag]=experiments/locating/smollm2/hellaswag.json [facts]=experiments/facts/recall.json)
declare -A DATASET=([arc_easy]=arc_easy [piqa]=piqa [hellaswag]=hellaswag [facts]=examples/facts/recall)

task_options() {  # the options section 6 (harness prompts, the first 1,000 train rows) or 7 located with
  case $1 in
    facts) echo "--dataset examples/facts/recall" ;;
    *) echo "--dataset $1 --prompt harness --split train --pool 1000" ;;
  esac
}

locate_step() {  # locate TASK SELECTOR
  local from=(--samples-from "${CIRCUIT[$1]}") task=$(task_options "$1")
  if [ "$1" = facts ] && [ "$2" = probe ]; then  # recall has one target a row: the probes read the choice rows
    task="--dataset examples/facts/choice" from=()
  fi
  python locate.py $task --selector "$2" "${from[@]}" --heads-per-layer 2 --no-validate --no-progress --resume \
    --out "$out/$1.$2.json"
}

eval_step() {  # eval TASK SELECTOR: the task's metric with the selector's heads masked, on section 6's (7's) rows
  local limit=(--limit $ROWS) prompt=(--prompt harness)
  [ "$1" = facts ] && limit=() prompt=()
  python evaluate.py --dataset "${DATASET[$1]}" "${prompt[@]}" "${limit[@]}" --mask "$out/$1.$2.json" \
    --log-samples --no-progress --out "$out/$1.$2.circuit.json"
}

global_step() {  # global TASK SELECTOR: ITI's and LoFiT's own pick, the top heads over the whole model (as many as
  # the per-layer pick's), as a circuit file (heads.json with that pick), masked on the same rows as eval's
  python -c 'import sys; from cli.json_records import read_json, write_json
found = read_json(sys.argv[1], "a selector circuit")
pick = {layer: {"retain_heads": heads} for layer, heads in found["global_circuit"].items()}
write_json(sys.argv[2], {**found, "knowledge_circuit": pick, "global_pick": True})' \
    "$out/$1.$2.json" "$out/$1.$2.global.json"
  local limit=(--limit $ROWS) prompt=(--prompt harness)
  [ "$1" = facts ] && limit=() prompt=()
  python evaluate.py --dataset "${DATASET[$1]}" "${prompt[@]}" "${limit[@]}" --mask "$out/$1.$2.global.json" \
    --log-samples --no-progress --out "$out/$1.$2.global.circuit.json"
}

# finetune TASK METHOD SEED: HeadMap (MHA) on a selector's circuit (METHOD = the selector; conditioned is section
# 6's/7's circuit) or LoRA; every run's accuracy_before is the no-adapter row. One short budget for all: 40 steps at
# batch 16, 4 warm-up steps, the validation loss every 10 steps.
finetune_step() {
  local task=$1 method=$2 seed=$3 run=runs/selectors/$1_$2_s$3 kept=$out/finetune/$1_$2_s$3
  local heads=(--method headmap --heads "$out/$task.$method.json")
  case $method in
    conditioned) heads=(--method headmap --heads "${CIRCUIT[$task]}") ;;
    lora) heads=(--method lora) ;;
  esac
  local rows=(--eval-limit $ROWS --prompt harness)
  [ "$task" = facts ] && rows=()
  python finetune.py --dataset "${DATASET[$task]}" "${rows[@]}" "${heads[@]}" --seed "$seed" --max-steps 40 \
    --warmup 4 --eval-every 10 --no-progress --out "$run" $( [ -d "$run" ] && echo --resume )
  mkdir -p "$out/finetune"
  cp "$run/training.json" "$kept.json"
  cp "$run/log.jsonl" "$kept.log.jsonl"
}

steps=()
for task in arc_easy piqa hellaswag facts; do
  for selector in $SELECTORS; do steps+=("locate $task $selector" "eval $task $selector"); done
done
for task in arc_easy piqa hellaswag facts; do
  for selector in probe lofit; do steps+=("global $task $selector"); done
done
for seed in 0 1 2; do  # seed by seed, so that a budget cut short leaves both tasks with the same seeds
  for task in facts arc_easy; do  # facts first: its steps take a minute, ARC-Easy's five
    for method in conditioned $SELECTORS lora; do steps+=("finetune $task $method $seed"); done
  done
done

output() {  # the file whose existence marks a step finished
  set -- $1
  case $1 in
    locate) echo "$out/$2.$3.json" ;;
    eval) echo "$out/$2.$3.circuit.json" ;;
    global) echo "$out/$2.$3.global.circuit.json" ;;
    finetune) echo "$out/finetune/$2_$3_s$4.json" ;;
  esac
}

mkdir -p "$out" runs/selectors
mode=${1:-next}
case $mode in
  list) for step in "${steps[@]}"; do
          if [ -f "$(output "$step")" ]; then echo "done  $step"; else echo "todo  $step"; fi
        done ;;
  next|all)
    for step in "${steps[@]}"; do
      [ -f "$(output "$step")" ] && continue
      echo "== $step ($(date +%H:%M:%S))" >&2
      set -- $step
      start=$SECONDS
      "$1_step" "${@:2}"
      echo "$step $((SECONDS - start))" >> "$out/steps.log"
      [ "$mode" = next ] && exit 0
    done ;;
  *) echo "error: unknown mode '$mode'; use next, all or list" >&2; exit 2 ;;
esac
