#!/usr/bin/env bash
# The paper's locating claims on all eight datasets and two model families (RESULTS.md section 6). One step per
# call, each under an hour on 2 CPU cores; finished steps are skipped, an interrupted one resumes:
#   bash experiments/locating.sh           # the next unfinished step
#   bash experiments/locating.sh all       # every unfinished step, in order
#   bash experiments/locating.sh list      # every step, done or not
#   bash experiments/locating.sh all gemma # only one model's steps
# Two runs at once (one thread each: OMP_NUM_THREADS=1) use both cores; they never take the same step. A run with
# nothing left to take looks again every LOCATING_POLL_SECONDS (60).
# Gemma's steps need models/gemma-3-270m-q4_k_m.gguf: bash experiments/get_gemma.sh
# Writes experiments/locating/<model>/<circuit>.json (+ .svg heat map) and, beside it, <circuit>.<what>.json:
# evaluate.py's scores on the first 500 evaluation rows with no mask, the circuit masked, or random heads of the
# circuit's per-layer counts masked (seed k). experiments/report.py prints the tables from them. Each finished
# step's wall time goes to experiments/locating/steps.log.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASETS="arc_easy piqa siqa winogrande openbookqa arc_challenge boolq hellaswag"
ROWS=500      # evaluation rows per dataset
TRIALS=10     # random head sets per circuit
NTRIALS=3     # random head sets per circuit of the n ablations
declare -A MODEL=([smollm2]=smollm2-135m [gemma]=models/gemma-3-270m-q4_k_m.gguf)

data_dir() {  # BoolQ's harness prompts read the passage, which only its validation split has (boolq_halves.py)
  if [ "$1" = boolq ]; then
    [ -f runs/boolq_halves/boolq/validation.jsonl ] || python experiments/boolq_halves.py runs/boolq_halves >&2
    echo runs/boolq_halves
  else
    echo data/datasets
  fi
}

# locate MODEL DATASET NAME [locate.py options]: D = 64 samples (unless given) from the first 1,000 train rows,
# harness prompts (both models answer letters near chance), a quarter of the heads per layer unless given
locate_step() {
  local model=$1 dataset=$2 name=$3; shift 3
  python locate.py --model "${MODEL[$model]}" --dataset "$dataset" --data-dir "$(data_dir "$dataset")" \
    --prompt harness --split train --pool 1000 --samples 64 --no-validate --seed 0 \
    --out "experiments/locating/$model/$name.json" --resume --no-progress "$@"
}

# eval MODEL DATASET NAME WHAT: WHAT is none, circuit or random<k>
eval_step() {
  # per-row scores (--log-samples) for no mask and the circuit only: the random draws need none, and 178 of them
  # would double the repository
  local model=$1 dataset=$2 name=$3 what=$4 mask=() samples=(--log-samples)
  local circuit=experiments/locating/$model/$name.json
  case $what in
    circuit) mask=(--mask "$circuit") ;;
    random*) mask=(--mask "$circuit" --random-mask --seed "${what#random}") samples=() ;;
  esac
  python evaluate.py --model "${MODEL[$model]}" --dataset "$dataset" --data-dir "$(data_dir "$dataset")" \
    --prompt harness --limit $ROWS --no-progress "${samples[@]}" "${mask[@]}" \
    --out "experiments/locating/$model/$name.$what.json"
}

steps=()
for dataset in $DATASETS; do  # the claim on every dataset first, both models dataset by dataset
  for model in smollm2 gemma; do
    steps+=("locate $model $dataset $dataset" "eval $model $dataset $dataset none" "eval $model $dataset $dataset circuit")
    for k in $(seq 1 $TRIALS); do steps+=("eval $model $dataset $dataset random$k"); done
  done
done
# Then the ablations of the locating itself, on two datasets per model. Only D = 32 scores the pool again (its
# losses are recorded): the n ablations take the D = 64 circuit's samples, D = 16 and 8 the lowest-loss of D = 32's,
# the samples scoring the pool would choose (locate.py --samples-from).
for model in smollm2 gemma; do
  for dataset in arc_easy piqa; do
    if [ $model = smollm2 ]; then ns="1 3"; else ns="2"; fi  # the main circuits keep 2 of 9, 1 of 4
    from=experiments/locating/$model/$dataset
    for n in $ns; do steps+=("locate $model $dataset ${dataset}_n$n --heads-per-layer $n --samples-from $from.json"); done
    steps+=("locate $model $dataset ${dataset}_d32 --samples 32")
    for d in 16 8; do steps+=("locate $model $dataset ${dataset}_d$d --samples $d --samples-from ${from}_d32.json"); done
    for n in $ns; do
      steps+=("eval $model $dataset ${dataset}_n$n circuit")
      # random heads of its own per-layer counts (the D ablations keep the main circuit's, so share its draws)
      for k in $(seq 1 $NTRIALS); do steps+=("eval $model $dataset ${dataset}_n$n random$k"); done
    done
    for d in 8 16 32; do steps+=("eval $model $dataset ${dataset}_d$d circuit"); done
  done
done

# Last, fine-tuning on the second model (RESULTS.md section 4's harness block on SmolLM2): ARC-Easy, seed 0,
# PROTOCOL's full budget (finetune.py's defaults: 282 steps at batch 16), trained on harness-style text (prompt +
# " " + answer) and scored with harness prompts, here on the first 500 test rows (section 6's evaluation rows).
for method in headmap_mha headmap_random lora; do steps+=("finetune gemma arc_easy $method"); done

# finetune MODEL DATASET METHOD: HeadMap (MHA) on the circuit's heads (headmap_mha), on random heads of its
# per-layer counts (headmap_random), or LoRA (lora). Adapters go to runs/locating/ (not committed); training.json
# and log.jsonl to finetune/ beside the circuits, named as full_protocol.sh names its runs (report.py reads both
# alike). A step interrupted resumes from its last checkpoint.
finetune_step() {
  local model=$1 dataset=$2 method=$3
  local heads=(--heads "experiments/locating/$model/$dataset.json" --method headmap --variant mha)
  local name=${dataset}_harness_${method}_s0
  local out=runs/locating/${model}_$name kept=experiments/locating/$model/finetune/$name
  case $method in
    headmap_random) heads+=(--random-heads) ;;
    lora) heads=(--method lora) ;;
  esac
  python finetune.py --model "${MODEL[$model]}" --dataset "$dataset" --prompt harness --eval-limit $ROWS --seed 0 \
    "${heads[@]}" --out "$out" --resume --no-progress
  mkdir -p "$(dirname "$kept")"
  cp "$out/log.jsonl" "$kept.log.jsonl"
  cp "$out/training.json" "$kept.json"
}

output() {  # the file whose existence marks a step finished
  set -- $1
  case $1 in
    locate) echo "experiments/locating/$2/$4.json" ;;
    eval) echo "experiments/locating/$2/$4.$5.json" ;;
    finetune) echo "experiments/locating/$2/finetune/$3_harness_$4_s0.json" ;;
  esac
}

needs() {  # the file a step reads that another step writes: an evaluation or fine-tuning needs its circuit, a
  set -- $1  # locate with --samples-from the circuit whose samples it takes
  case $1 in
    eval) echo "experiments/locating/$2/$4.json" ;;
    finetune) echo "experiments/locating/$2/$3.json" ;;
    locate) while [ $# -gt 1 ]; do [ "$1" = --samples-from ] && echo "$2"; shift; done ;;
  esac
}

run_step() {
  set -- $1
  local kind=$1; shift
  "${kind}_step" "$@"
}

mode=${1:-next} only=${2:-}  # a model name keeps that model's steps only
if [ -n "$only" ] && [ -z "${MODEL[$only]:-}" ]; then
  echo "error: unknown model '$only'; use one of: ${!MODEL[*]}" >&2; exit 2
fi
mine=()
for step in "${steps[@]}"; do
  set -- $step
  if [ -z "$only" ] || [ "$2" = "$only" ]; then mine+=("$step"); fi
done

# Several runs of this script share the work: each step is claimed with a lock (flock, released when its holder
# exits or dies), so two runs never take the same step, and a step waits until the circuit it needs exists.
locks=runs/locating/locks
mkdir -p $locks
lock_of() { echo "$locks/${1//[ \/]/_}.lock"; }  # a step names paths: no slashes in the file name

case $mode in
  list)
    for step in "${mine[@]}"; do
      if [ -f "$(output "$step")" ]; then echo "done  $step"
      elif [ -f "$(lock_of "$step")" ] && ! flock -n "$(lock_of "$step")" true; then echo "run   $step"
      else echo "todo  $step"; fi
    done ;;
  next|all)
    [ -f runs/boolq_halves/boolq/validation.jsonl ] || data_dir boolq > /dev/null  # once, before runs share it
    while :; do
      ran=0 waiting=0
      for step in "${mine[@]}"; do
        [ -f "$(output "$step")" ] && continue
        need=$(needs "$step")
        if [ -n "$need" ] && [ ! -f "$need" ]; then waiting=1; continue; fi
        exec {lock}>"$(lock_of "$step")"
        if ! flock -n $lock; then exec {lock}>&-; waiting=1; continue; fi  # another run has it
        if [ -f "$(output "$step")" ]; then exec {lock}>&-; continue; fi  # finished since the check above
        echo "== $step" >&2
        mkdir -p "$(dirname "$(output "$step")")"
        start=$SECONDS
        run_step "$step"
        echo "$(date -u +%Y-%m-%dT%H:%M:%S) $((SECONDS - start))s $step" >> experiments/locating/steps.log
        exec {lock}>&-
        [ "$mode" = all ] || exit 0
        ran=1
        break  # from the first step again: a circuit just found makes its evaluations ready
      done
      if [ $ran = 0 ]; then
        if [ $waiting = 0 ]; then echo "every step is done" >&2; exit 0; fi
        if [ "$mode" = next ]; then echo "every unfinished step is running in another run or waits for one" >&2; exit 0; fi
        sleep "${LOCATING_POLL_SECONDS:-60}"  # what is left runs elsewhere or waits for a circuit located there
      fi
    done ;;
  *) echo "usage: bash experiments/locating.sh [next|all|list] [MODEL]" >&2; exit 2 ;;
esac
