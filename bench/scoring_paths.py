"""evaluate.py's scoring path against the path it replaced and against one stock forward per choice, one run.

    python bench/scoring_paths.py --dataset arc_easy --prompt harness
    python bench/scoring_paths.py --dataset hellaswag --prompt harness --rows 100
    python bench/scoring_paths.py --prompt paper --naive     # also time one stock forward pass per choice (slow)

Now: each prompt runs once (prompts of equal length batched, no padding) and every multi-token choice runs
against its key/value cache. Before: one right-padded row per prompt + choice, longest first, the LM head at the
answer positions only (single-token choices read from one prompt pass, as now).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from bench.naive import choice_scores_one_by_one  # noqa: E402
from cli.loading import DEFAULT_MODEL, load_model  # noqa: E402
from data.scoring import accuracy, encode_pair, pad_id_of, score_examples  # noqa: E402
from headmap.batching import pad_right  # noqa: E402
from data.commonsense import default_data_dir, load_examples  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default=DEFAULT_MODEL)
p.add_argument("--dataset", default="arc_easy")
p.add_argument("--split", default="validation")
p.add_argument("--rows", type=int, default=200)
p.add_argument("--prompt", default="harness")
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--naive", action="store_true", help="also time one stock forward pass per choice")
p.add_argument("--device", default="auto")
p.add_argument("--data-dir", default=default_data_dir())
args = p.parse_args()


@torch.inference_mode()
def previous_path(model, tok, examples, batch_size):
    """The path before key/value caching, kept here as the baseline."""
    device, pad = next(model.parameters()).device, pad_id_of(tok)
    rows = []  # (ids, [(example, choice, first answer position, targets)])
    for e, ex in enumerate(examples):
        pairs = [encode_pair(tok, prompt, cont) for prompt, cont in zip(ex.prompts, ex.continuations)]
        if all(ctx == pairs[0][0] and len(cont) == 1 for ctx, cont in pairs):
            rows.append((pairs[0][0], [(e, c, len(ctx) - 1, cont) for c, (ctx, cont) in enumerate(pairs)]))
        else:
            rows += [(ctx + cont, [(e, c, len(ctx) - 1, cont)]) for c, (ctx, cont) in enumerate(pairs)]
    rows.sort(key=lambda r: -len(r[0]))
    scores = [[0.0] * len(ex.continuations) for ex in examples]
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        ids, mask = pad_right([r[0] for r in batch], pad, device)
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        for r, (_, spans) in enumerate(batch):
            for e, c, first, targets in spans:
                logits = model.get_output_embeddings()(hidden[r, first:first + len(targets)]).float()
                scores[e][c] = torch.log_softmax(logits, -1)[range(len(targets)), targets].sum().item()
    return scores


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


now, t_now = timed(lambda: score_examples(model, tok, examples, args.batch_size, progress=False))
before, t_before = timed(lambda: previous_path(model, tok, examples, args.batch_size))
preds = accuracy(examples, now)["predictions"]
gap = max(abs(a - b) for x, y in zip(now, before) for a, b in zip(x, y))
device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
print(f"{args.dataset} {args.split} {len(examples)} rows, {args.prompt} prompts, {args.model} on {device}")
print(f"evaluate.py now        : {t_now:8.2f} s")
print(f"previous path          : {t_before:8.2f} s   speed-up {t_before / t_now:.2f}x   predictions identical: "
      f"{preds == accuracy(examples, before)['predictions']}   max |score difference| {gap:.1e}")
if args.naive:
    slow, t_slow = timed(lambda: choice_scores_one_by_one(model, tok, examples))
    print(f"one forward per choice : {t_slow:8.2f} s   speed-up {t_slow / t_now:.2f}x   predictions identical: "
          f"{preds == accuracy(examples, slow)['predictions']}")
