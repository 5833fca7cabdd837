"""The paper's whole protocol for one model, on GPUs (experiments/paper.sh is this script):

    bash experiments/paper.sh --model meta-llama/Llama-2-7b-hf --plan     # the steps, their sizes, a time estimate
    bash experiments/paper.sh --model meta-llama/Llama-2-7b-hf --gpus 8   # run them (torchrun over 8 GPUs)

For each of the eight datasets: the knowledge circuit (locate.py: paper prompts, D = 64 from the whole train
split, a quarter of the heads per layer, validation against random heads), then HeadMap on it, HeadMap on random
heads of the same per-layer counts, LoRA and DoRA, each at the paper's budget (finetune.py's defaults: 2 epochs,
batch 16, the best validation loss kept) and each evaluated on the whole evaluation split before and after
(training.json). One command per step; a step whose output exists is skipped, an interrupted one resumes, so
running the same command again continues. The limits (--samples, --train-limit, ...) shrink every step alike,
for a smoke test.
"""
import argparse
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cli.arguments import HelpFormatter, check_at_least  # noqa: E402
from cli.exits import UsageError, run_script
from data.commonsense import DATASETS, check_dataset  # noqa: E402

METHODS = {"headmap": [], "headmap_random": ["--random-heads"], "lora": ["--method", "lora"],
           "dora": ["--method", "dora"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="hub id, local folder or .gguf file")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of this machine: above 1, each step runs under torchrun")
    p.add_argument("--out", help="where circuits and adapters go (default: runs/paper/<model name>)")
    p.add_argument("--plan", action="store_true", help="print the steps with their sizes and times; run nothing")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma list")
    p.add_argument("--samples", type=int, default=64, help="D")
    p.add_argument("--pool", type=int, help="choose D from the first N train rows (default: all)")
    p.add_argument("--validate-limit", type=int, default=500, help="rows of locate's validation")
    p.add_argument("--train-limit", type=int, help="train on the first N rows (default: all)")
    p.add_argument("--max-steps", type=int, help="stop each run after N steps (default: 2 epochs)")
    p.add_argument("--val-limit", type=int, help="cap each run's held-out set")
    p.add_argument("--eval-limit", type=int, help="rows of the evaluation split (default: all)")
    args = p.parse_args(argv)
    args.datasets = args.datasets.split(",")
    for name in args.datasets:
        check_dataset(name)
    check_at_least(args, 1, "gpus", "samples", "pool", "validate_limit", "train_limit", "max_steps", "val_limit",
                   "eval_limit")
    args.out = args.out or os.path.join("runs", "paper", os.path.basename(os.path.normpath(args.model)))
    return args


def steps(args) -> list[tuple[str, str, list[str]]]:
    """(name, the output that marks it done, the command) of every step, in order."""
    limits = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("train_limit", "max_steps", "val_limit",
                                                                      "eval_limit") if getattr(args, k)]
    found = []
    for name in args.datasets:
        circuit = os.path.join(args.out, "circuits", f"{name}.json")
        locate = ["locate.py", "--model", args.model, "--dataset", name, "--samples", str(args.samples),
                  "--validate-limit", str(args.validate_limit), "--out", circuit, "--resume", "--no-progress"]
        found.append((f"{name}: circuit", circuit, locate + ([f"--pool={args.pool}"] if args.pool else [])))
        for method, options in METHODS.items():
            out = os.path.join(args.out, "adapters", f"{name}_{method}")
            source = ["--heads", circuit] if method.startswith("headmap") else ["--dataset", name, "--model", args.model]
            found.append((f"{name}: {method}", os.path.join(out, "training.json"),
                          ["finetune.py", *source, *options, *limits, "--out", out, "--resume", "--no-progress"]))
    return found


def command(args, argv: list[str], python: str = sys.executable) -> list[str]:
    launcher = ["torchrun", "--standalone", f"--nproc_per_node={args.gpus}"] if args.gpus > 1 else [python]
    return launcher + argv


def plan(args, todo) -> None:
    """The steps with their rows, optimizer steps and a time estimate for a 7B model on the measured H200 rates."""
    sys.path.insert(0, str(ROOT / "bench"))
    from protocol_estimate import estimate  # noqa: E402 - loads nothing until called

    from cli.loading import load_tokenizer
    from data.commonsense import load_rows
    tok = load_tokenizer(args.model)  # the rows' token lengths in the user's model's own tokens
    total = 0.0
    print(f"{'step':<28}{'done':<6}{'train rows':>11}{'steps':>8}{'est. min':>10}  command")
    for name in args.datasets:
        rows = len(load_rows(name, "train"))
        rows = min(rows, args.train_limit or rows)
        if DATASETS[name].eval_split == "validation":  # finetune.py holds 10% of train out (at most 2,000 rows)
            rows -= min(2000, max(1, rows // 10))
        n_steps = min(args.max_steps or 10 ** 9, math.ceil(rows / 16) * 2)
        e = estimate(tok, name, rows, n_steps)
        minutes = {"circuit": e["locate"] / 60, **{m: e["train"][m.replace("_", "-")] / 60 for m in METHODS}}
        for step, output, argv in todo:
            if not step.startswith(name + ":"):
                continue
            what = step.split(": ")[1]
            took = minutes[what] / args.gpus
            total += 0 if os.path.exists(output) else took
            print(f"{step:<28}{'yes' if os.path.exists(output) else '':<6}"
                  f"{rows if what != 'circuit' else '':>11}{n_steps if what != 'circuit' else '':>8}{took:>10.1f}  "
                  f"{shlex.join(command(args, argv, 'python'))}")
    print(f"\nleft to run: about {total / 60:.1f} hours for a 7B model on {args.gpus} H200 GPU(s), from the rates "
          "measured in BENCHMARKS.md (an upper bound for training; a smaller model is faster)")


def main(argv=None):
    args = parse_args(argv)
    todo = steps(args)
    if args.plan:
        plan(args, todo)
        return
    for step, output, argv in todo:
        if os.path.exists(output):
            print(f"done    {step}")
            continue
        print(f"running {step}: {shlex.join(command(args, argv))}", flush=True)
        started = time.time()
        if subprocess.run(command(args, argv), cwd=ROOT).returncode != 0:
            raise UsageError(f"step '{step}' failed (its error is above); fix it and run the same command again: "
                             "finished steps are skipped, this one resumes")
        print(f"finished {step} in {(time.time() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    run_script(main)
