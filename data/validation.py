"""A located circuit validated on the task: its metric with the circuit masked against random heads of the same
per-layer counts, and whether the model knows the task well enough for that to mean anything."""
import math
import statistics
import sys
from contextlib import nullcontext

import torch

from data.common import CHOICE
from data.scoring import PRIMARY, baselines, task_metric
from headmap.circuit import circuit_mask, random_circuit_like
from headmap.masking import layers_and_heads, mask_heads


def validate_circuit(model, tokenizer, task, examples, circuit, trials, seed, batch_size, progress=True):
    """The task's metric (acc, or exact_match for one target) with no mask, with the circuit masked, and with random
    heads of the same per-layer counts."""
    layers, heads = layers_and_heads(model)

    def score(circ, desc):
        with mask_heads(model, circuit_mask(circ, layers, heads)) if circ is not None else nullcontext():
            return task_metric(model, tokenizer, task.kind, examples, batch_size, progress, desc)

    g = torch.Generator().manual_seed(seed)
    random_scores = [score(random_circuit_like(circuit, heads, g), f"random heads masked, {k + 1} of {trials}")
                     for k in range(trials)]
    return {"rows": len(examples), "metric": PRIMARY[task.kind], "unmasked": score(None, "unmasked"),
            "circuit_masked": score(circuit, "circuit masked"), "random_masked_mean": statistics.mean(random_scores),
            "random_masked_std": statistics.stdev(random_scores) if trials > 1 else 0.0, "random_masked": random_scores,
            **baselines(task.kind, examples)}


def knows_the_task(v: dict) -> bool:
    """Whether the unmasked accuracy is clearly (two standard errors) above both chance and the majority class:
    only then is a circuit whose masking lowers it a circuit of task knowledge."""
    floor = max(v["chance"], v["majority"])
    return v["unmasked"] > floor + 2 * math.sqrt(floor * (1 - floor) / v["rows"])


def print_validation(v: dict, kind: str, prompt: str | None, split: str, trials: int) -> None:
    """validate_circuit's numbers as one line, and a warning where the model does not know the task well enough
    for its circuit to mean much."""
    commonest = "majority class" if kind == CHOICE else "commonest target"
    print(f"\n{v['metric']} on {v['rows']} rows of {split}: unmasked {v['unmasked']:.3f} "
          f"(chance {v['chance']:.3f}, {commonest} {v['majority']:.3f}), circuit masked "
          f"{v['circuit_masked']:.3f}, random heads masked {v['random_masked_mean']:.3f} "
          + (f"+- {v['random_masked_std']:.3f} ({trials} draws)" if trials > 1
             else "(1 draw: no spread to give)"))
    if not knows_the_task(v):
        print(f"warning: the unmasked model ({v['unmasked']:.3f}) is not clearly above chance ({v['chance']:.3f}) "
              f"and the {commonest} ({v['majority']:.3f}), so the circuit says little about task knowledge; "
              + ("try --prompt harness" if prompt == "paper" else "try a task the model can do"),
              file=sys.stderr)
