"""locate_circuit (locate.py's algorithm) vs the naive loop (one full masked forward per candidate), same samples, one run.

    python bench/locate_vs_naive_loop.py --dataset arc_easy --samples 16
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from data.samples import select_samples  # noqa: E402
from bench.naive import locate_brute_force  # noqa: E402
from cli.loading import DEFAULT_MODEL, load_model  # noqa: E402
from data.samples import answer_samples  # noqa: E402
from data.commonsense import Commonsense, default_data_dir  # noqa: E402
from headmap.locate import default_token_budget, locate_circuit  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default=DEFAULT_MODEL)
p.add_argument("--dataset", default="arc_easy")
p.add_argument("--split", default="train")
p.add_argument("--pool", type=int, default=200)
p.add_argument("--prompt", default="paper")
p.add_argument("--samples", type=int, default=16)
p.add_argument("--heads-per-layer", type=int)
p.add_argument("--batch-size", type=int, default=64, help="prompts per pass while choosing the samples")
p.add_argument("--token-budget", type=int, help="default: locate.py's (65536 on a GPU, 1024 on a CPU)")
p.add_argument("--device", default="auto")
p.add_argument("--data-dir", default=default_data_dir())
args = p.parse_args()

model, tok = load_model(args.model, args.device)
heads = model.config.num_attention_heads
n = args.heads_per_layer or max(1, round(heads / 4))
task = Commonsense(args.dataset, args.prompt, args.data_dir)
pool = task.examples(args.split, args.pool)
chosen = select_samples(model, tok, task, pool, args.samples, args.batch_size)["sample_indices"]
examples = [pool[i] for i in chosen]
device = next(model.parameters()).device
budget = args.token_budget or default_token_budget(device)


def timed(fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


state = {"circuit": {}, "loss_matrix": []}
fast, t_fast = timed(lambda: locate_circuit(model, answer_samples(tok, examples), n, budget, state=state)[0])
(naive, naive_losses, _), t_naive = timed(lambda: locate_brute_force(model, tok, examples, n))
gap = (torch.tensor(state["loss_matrix"]) - torch.tensor(naive_losses)).abs().max().item()
where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
print(f"{args.model} on {where}: {args.dataset} {args.prompt} prompts, {len(examples)} samples, "
      f"{model.config.num_hidden_layers} layers x {heads} heads, n={n}, token budget {budget}")
print(f"locate.py          : {t_fast:8.1f} s")
print(f"naive (fwd / cand) : {t_naive:8.1f} s")
print(f"speed-up           : {t_naive / t_fast:8.2f}x   circuits identical: {fast == naive}   "
      f"max loss difference: {gap:.2e}")
