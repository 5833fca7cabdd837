"""evaluate.py's scoring path vs naive one-forward-per-choice scoring, same rows, one run.

    python bench/evaluate.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from data import accuracy, default_data_dir, load_examples, score_examples  # noqa: E402
from kernels.model import DEFAULT_MODEL, load_model  # noqa: E402
from tests.reference import choice_scores_one_by_one  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default=DEFAULT_MODEL)
p.add_argument("--dataset", default="arc_easy")
p.add_argument("--split", default="validation")
p.add_argument("--rows", type=int, default=100)
p.add_argument("--prompt", default="paper")
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--device", default="auto")
p.add_argument("--data-dir", default=default_data_dir())
args = p.parse_args()

model, tok = load_model(args.model, args.device)
examples = load_examples(args.dataset, args.split, args.prompt, args.data_dir, args.rows)
score_examples(model, tok, examples[:4], progress=False)  # warm-up


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


fast, t_fast = timed(lambda: score_examples(model, tok, examples, args.batch_size, progress=False))
slow, t_slow = timed(lambda: choice_scores_one_by_one(model, tok, examples))
same = accuracy(examples, fast)["predictions"] == accuracy(examples, slow)["predictions"]
device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
print(f"{args.dataset} {args.split} {len(examples)} rows, {args.prompt} prompts, {args.model} on {device}")
print(f"evaluate.py path : {t_fast:8.2f} s")
print(f"one fwd / choice : {t_slow:8.2f} s")
print(f"speed-up         : {t_slow / t_fast:8.2f}x   predictions identical: {same}")
