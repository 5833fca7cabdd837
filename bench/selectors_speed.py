"""Every head selector of locate.py against the paper's search, on the same D in one run: the seconds each takes to
score every head (its score matrix alone; D chosen already), the circuits they pick, and how well attribution's
estimate ranks the heads as their exact independent effect does.

    python bench/selectors_speed.py --samples-from experiments/circuits/arc_easy_d64.json \\
        --out bench/results/selectors_arc_easy_d64.json

D is the samples an earlier locate run chose (its model, task, split, pool and prompt), so no pool is scored here.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from cli.json_records import software_versions, write_json  # noqa: E402
from cli.loading import load_model  # noqa: E402
from data.samples import answer_samples  # noqa: E402
from data.tasks import open_task  # noqa: E402
from headmap.locate import default_token_budget, locate_circuit  # noqa: E402
from headmap.selectors import (attribution_scores, circuit_from_scores, independent_scores,  # noqa: E402
                               random_scores, rank_correlation)

p = argparse.ArgumentParser()
p.add_argument("--samples-from", required=True, help="a heads.json of locate.py: its model, task and samples")
p.add_argument("--token-budget", type=int, help="default: locate.py's (1024 on a CPU)")
p.add_argument("--device", default="auto")
p.add_argument("--out", required=True)
args = p.parse_args()

earlier = json.loads(Path(args.samples_from).read_text())
model, tok = load_model(earlier["model"], args.device)
task = open_task(earlier["dataset"], earlier["prompt"])
pool = task.examples(earlier["split"], earlier["pool"])
samples = answer_samples(tok, [pool[i] for i in earlier["sample_indices"]])
device = next(model.parameters()).device
budget = args.token_budget or default_token_budget(device)
layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
n = earlier["heads_per_layer"]
scorers = {
    "attribution": lambda: attribution_scores(model, samples, budget),
    "random": lambda: random_scores(layers, heads, 0),
    "independent": lambda: independent_scores(model, samples, budget, progress=True),
    "conditioned": lambda: locate_circuit(model, samples, n, budget, progress=True)[1],
}
results = {}
for name, score in scorers.items():
    start = time.perf_counter()
    scores = score()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    results[name] = {"seconds": round(seconds, 2), "score_matrix": scores.tolist(),
                     "circuit": circuit_from_scores(scores, n)}
    print(f"{name}: {seconds:.1f} s", flush=True)

conditioned = results["conditioned"]["seconds"]
exact, estimate = results["independent"]["score_matrix"], results["attribution"]["score_matrix"]
summary = {
    "attribution_speedup_over_conditioned": round(conditioned / results["attribution"]["seconds"], 1),
    "independent_over_conditioned_seconds": round(results["independent"]["seconds"] / conditioned, 3),
    "attribution_rank_correlation": rank_correlation(sum(estimate, []), sum(exact, [])),
    "attribution_rank_correlation_per_layer": [rank_correlation(a, b) for a, b in zip(estimate, exact)],
}
where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
print(f"{earlier['model']} on {where}, {earlier['dataset']} {earlier['prompt']} prompts, D = {len(samples)}, "
      f"n = {n}: attribution {summary['attribution_speedup_over_conditioned']}x faster than conditioned; "
      f"independent takes {summary['independent_over_conditioned_seconds']}x conditioned's time; attribution "
      f"against independent: rank correlation {summary['attribution_rank_correlation']:.3f}")
write_json(args.out, {"samples_from": args.samples_from, "device": where, "token_budget": budget, "samples":
                      len(samples), "heads_per_layer": n, **summary, "selectors": results,
                      "versions": software_versions()})
