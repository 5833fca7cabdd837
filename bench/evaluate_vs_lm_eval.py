"""evaluate.py's scoring against lm-evaluation-harness's HF backend at the 7B shape, same GPU, same model, same rows.

    python bench/evaluate_vs_lm_eval.py --out evaluate.json              # on a CUDA GPU (bench/gpu.sh runs it)
    python bench/evaluate_vs_lm_eval.py --dry-run --out evaluate.json    # on a CPU: tiny shape, 8 rows (CI)

The model is a random-weight LLaMA-2-7B shape in bf16 whose vocabulary is the tokenizer's (--tokenizer: a folder,
hub id or .gguf; default SmolLM2's); the rows are the first --rows of the bundled ARC-Easy test split with the
harness prompts, which lm-eval scores through its own arc_easy task pointed at the same rows. Both run batch 16
after an untimed warm-up on 4 rows; the speed-up is lm-eval's seconds over ours, and `identical` says whether acc
and acc_norm agree. Without lm-eval installed the file records that, and no speed-up.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli.arguments import add_out_arguments  # noqa: E402
from cli.exits import run_script
from cli.loading import DEFAULT_MODEL  # noqa: E402
from cli.json_records import write_json  # noqa: E402
from cli.outputs import check_writable

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--dry-run", action="store_true", help="CPU, a tiny model and 8 rows: checks the script (CI)")
p.add_argument("--rows", type=int, default=500)
p.add_argument("--tokenizer", default=DEFAULT_MODEL, help="whose tokenizer (and vocabulary size) the model takes")
add_out_arguments(p, "the figures as JSON", "evaluate.json")
args = p.parse_args()
run_script(lambda: check_writable(args.out, args.overwrite))
import torch  # noqa: E402

from bench.shapes import DRY_RUN_SHAPES, SHAPES, random_llama  # noqa: E402
from cli.loading import load_tokenizer  # noqa: E402
from data.scoring import accuracy, score_examples  # noqa: E402
from data.commonsense import BUNDLED, load_rows, make_example  # noqa: E402

device = "cpu" if args.dry_run else "cuda"
rows = load_rows("arc_easy", "test", BUNDLED, 8 if args.dry_run else args.rows)
examples = [make_example("arc_easy", row, "harness") for row in rows]
tokenizer = load_tokenizer(args.tokenizer)
shape = (DRY_RUN_SHAPES if args.dry_run else SHAPES)["llama2-7b"]
model = random_llama(shape, torch.float32 if args.dry_run else torch.bfloat16, device, vocab=len(tokenizer))
result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "rows": len(examples),
          "shape": shape, "vocab": len(tokenizer)}


def timed(fn):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


score_examples(model, tokenizer, examples[:4], 16, progress=False)
ours, result["evaluate_seconds"] = timed(lambda: score_examples(model, tokenizer, examples, 16, progress=False))
mine = accuracy(examples, ours)
result.update(acc=mine["acc"], acc_norm=mine["acc_norm"])
try:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
except ImportError:
    result["error"] = "lm-eval is not installed here (carry its wheels: .library/device README)"
else:
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "arc_easy.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        task = Path(folder) / "arc_easy.yaml"
        task.write_text(f"include: {Path(lm_eval.__file__).parent / 'tasks' / 'arc' / 'arc_easy.yaml'}\n"
                        f"task: arc_easy\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
                        f"    test: {data}\ntraining_split: null\nvalidation_split: null\n")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16)
        if not args.dry_run:  # warm-up: what lm-eval builds once per model and shape
            lm_eval.simple_evaluate(model=lm, tasks=[str(task)], limit=4, verbosity="ERROR")
        theirs, result["lm_eval_hf_seconds"] = timed(lambda: lm_eval.simple_evaluate(
            model=lm, tasks=[str(task)], verbosity="ERROR")["results"]["arc_easy"])
    result["speedup"] = result["lm_eval_hf_seconds"] / result["evaluate_seconds"]
    result["identical"] = (theirs["acc,none"], theirs["acc_norm,none"]) == (mine["acc"], mine["acc_norm"])
write_json(args.out, result)
print(json.dumps({k: v for k, v in result.items() if k != "shape"}))
