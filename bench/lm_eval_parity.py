"""evaluate.py --prompt harness against the real lm-evaluation-harness, on the same local rows, all eight datasets.

    pip install lm-eval==0.4.13        # not a dependency of this project: only this check needs it
    python bench/lm_eval_parity.py --limit 200

lm-eval runs its own built-in task configs (prompts, choices, targets, metrics), with only the data source
swapped for the first --limit rows of our bundled split, written to a temporary JSON Lines file. acc_norm is asked
of every task. The bundled HellaSwag validation split has no ctx_a/ctx_b (data/datasets/SOURCES.md), so its copy
for lm-eval sets ctx_a = ctx and ctx_b = "", which lm-eval's preprocessing turns into exactly `ctx`.
Prints acc and acc_norm of both, the rows whose prediction differs, the rows where the two disagree on whether
the normalised prediction is right (lm-eval logs only that), and the largest per-choice log-likelihood gap;
exits 1 on any difference.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.arguments import add_out_arguments  # noqa: E402
from cli.exits import run_script
from cli.loading import DEFAULT_MODEL, load_model  # noqa: E402
from cli.json_records import write_json  # noqa: E402
from cli.outputs import check_writable
from data.scoring import accuracy, score_examples  # noqa: E402
from data.commonsense import DATASETS, default_data_dir, load_examples, load_rows  # noqa: E402

LM_EVAL_TASK = {"boolq": "boolq", "piqa": "piqa", "siqa": "social_iqa", "arc_easy": "arc_easy",
                "arc_challenge": "arc_challenge", "openbookqa": "openbookqa", "hellaswag": "hellaswag",
                "winogrande": "winogrande"}

p = argparse.ArgumentParser()
p.add_argument("--model", default=DEFAULT_MODEL)
p.add_argument("--datasets", default=",".join(DATASETS))
p.add_argument("--limit", type=int, default=200)
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--device", default="auto")
p.add_argument("--data-dir", default=default_data_dir())
add_out_arguments(p, "write the table as JSON here")
args = p.parse_args()
if args.out:
    run_script(lambda: check_writable(args.out, args.overwrite))  # one line, exit 2

try:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
except ImportError:
    sys.exit("error: this check needs lm-evaluation-harness: pip install lm-eval==0.4.13")
import lm_eval  # noqa: E402

model, tokenizer = load_model(args.model, args.device)
lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]
table, mismatched = {}, 0
manager = TaskManager()
print(f"{args.model}, lm-eval {lm_eval.__version__}, first {args.limit} rows of each evaluation split")
print(f"{'dataset':<15}{'n':>5}{'acc ours':>10}{'lm-eval':>9}{'acc_norm ours':>15}{'lm-eval':>9}"
      f"{'pred diff':>11}{'norm diff':>11}{'max |dll|':>11}")
with tempfile.TemporaryDirectory() as tmp:
    for name in args.datasets.split(","):
        split = DATASETS[name].eval_split
        rows = load_rows(name, split, args.data_dir)[:args.limit]
        if name == "hellaswag":
            rows = [{**r, "ctx_a": r["ctx"], "ctx_b": ""} if r.get("ctx_a") is None else r for r in rows]
        data = Path(tmp) / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        # lm-eval's own way to run a registered task on other data: a task YAML that includes it and swaps the source
        config = Path(tmp) / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "include": str(manager.task_index[LM_EVAL_TASK[name]].yaml_path), "task": LM_EVAL_TASK[name],
            "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": {split: str(data)}},
            "training_split": None, "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None, "metric_list": metrics}))
        (spec,) = TaskManager(include_defaults=False).load([str(config)])["tasks"].values()
        out = simple_evaluate(model=lm, tasks=[spec], task_manager=manager, log_samples=True, verbosity="ERROR")
        samples = sorted(out["samples"][LM_EVAL_TASK[name]], key=lambda s: s["doc_id"])
        theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        summary = out["results"][LM_EVAL_TASK[name]]

        examples = load_examples(name, split, "harness", args.data_dir, args.limit)
        scores = score_examples(model, tokenizer, examples, args.batch_size, progress=False)
        ours = accuracy(examples, scores)
        pred = sum(a != max(range(len(t)), key=t.__getitem__) for a, t in zip(ours["predictions"], theirs))
        # lm-eval logs whether each row's normalised prediction is right, not the prediction itself
        norm = sum((a == ex.gold) != (s["acc_norm"] == 1.0)
                   for a, s, ex in zip(ours["predictions_norm"], samples, examples))
        gap = max(abs(a - b) for o, t in zip(scores, theirs) for a, b in zip(o, t))
        row = {"n": len(examples), "acc": ours["acc"], "acc_lm_eval": summary["acc,none"],
               "acc_norm": ours["acc_norm"], "acc_norm_lm_eval": summary["acc_norm,none"],
               "prediction_mismatches": pred, "acc_norm_mismatches": norm, "max_loglikelihood_gap": gap}
        table[name] = row
        mismatched += pred + norm
        print(f"{name:<15}{row['n']:>5}{row['acc']:>10.3f}{row['acc_lm_eval']:>9.3f}{row['acc_norm']:>15.3f}"
              f"{row['acc_norm_lm_eval']:>9.3f}{pred:>11}{norm:>11}{gap:>11.1e}", flush=True)
if args.out:
    write_json(args.out, table)
sys.exit(1 if mismatched else 0)
