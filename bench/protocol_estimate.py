"""The paper's whole protocol for one 7B model, estimated from the rates bench/gpu_scale.py measured (H200,
BENCHMARKS.md): the table in docs/scaling.md, and experiments/paper.sh --plan's times.

    python bench/protocol_estimate.py

Token lengths from the bundled data with SmolLM2's tokenizer (BoolQ's from its validation split: the bundled train
split has no passages); train sizes are the datasets' own (the bundled HellaSwag train split is partial).
Training time = tokens over the measured useful tokens/s (an upper bound: measured on 36-token rows, where a 7B
step is far from compute-bound); locate from its FLOPs at the measured rate for its prompt length; scoring at 265
TFLOP/s. 8 GPUs: the 40 jobs (locate + HeadMap, HeadMap on random heads, LoRA, DoRA, evaluation, per dataset)
placed longest first on the least-loaded GPU.
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.scoring import encode_pair  # noqa: E402
from data.training import training_texts
from data.commonsense import default_data_dir, load_examples  # noqa: E402

FULL_TRAIN = {"boolq": 9427, "piqa": 16113, "siqa": 33410, "hellaswag": 39905, "winogrande": 40398,
              "arc_easy": 2251, "arc_challenge": 1119, "openbookqa": 4957}
H, L, D, HIDDEN = 32, 32, 64, 4096  # LLaMA-2-7B, D = 64
LAYER_FLOPS = 2 * 202_375_168  # per token and layer: 2 x one layer's weights
FORWARD_FLOPS = 2 * 6.74e9  # per token, whole model
TOKENS_PER_S = {"headmap": 849, "headmap-random": 849, "lora": 3091, "dora": 1779}  # measured, H200
SCORE_RATE = 265e12


def locate_rate(n: float) -> float:
    """Measured: 265 TFLOP/s at 34-token prompts, 407 at 151; lower for shorter ones (fixed costs per pass)."""
    return 265e12 * n / 34 if n < 34 else 265e12 + 142e12 * min(1.0, (n - 34) / 117)


def estimate(tok, name: str, rows: int, steps: int, rates: dict = TOKENS_PER_S, locate_scale: float = 1.0) -> dict:
    """Seconds of each job of one dataset on one H200 for a 7B model: locate (with choosing D and validation),
    one training run per method of `steps` optimizer steps over `rows` train rows, and scoring five models; with
    the mean token lengths they come from. `rates`: training tokens/s per method; `locate_scale`: a measured locate
    rate over locate_rate's (bench/gpu_claims.py passes a new run's)."""
    split = "validation" if name == "boolq" else "train"
    texts = training_texts(tok, load_examples(name, split, "paper", default_data_dir(), 2000), 512)
    text_len = sum(map(len, texts)) / len(texts)
    harness = load_examples(name, split, "harness", default_data_dir(), 500)
    n = sum(sum(map(len, encode_pair(tok, e.prompts[e.gold], e.continuations[e.gold]))) for e in harness) / len(harness)
    evals = load_examples(name, None, "harness", default_data_dir(), None)
    sample = evals[:500]
    per_row = sum(len(encode_pair(tok, e.prompts[0], e.continuations[0])[0])
                  + sum(len(encode_pair(tok, p, c)[1]) for p, c in zip(e.prompts, e.continuations))
                  for e in sample) / len(sample)
    locate = H * L * (L + 1) / 2 * D * (n * LAYER_FLOPS + 2 * n * n * HIDDEN) / (locate_rate(n) * locate_scale)
    locate += (1000 + 7 * 500) * 2 * n * FORWARD_FLOPS / SCORE_RATE  # choosing samples, validation
    trained_rows = min(rows * 2, steps * 16)
    validation = (steps // 200 + 1) * min(2000, rows // 10) * text_len * FORWARD_FLOPS / SCORE_RATE
    train = {m: trained_rows * text_len / rate + validation for m, rate in rates.items()}
    return {"prompt_tokens": n, "text_tokens": text_len, "locate": locate, "train": train,
            "evaluation": 5 * per_row * len(evals) * FORWARD_FLOPS / SCORE_RATE}


def totals(tok, rates: dict = TOKENS_PER_S, locate_scale: float = 1.0, table: bool = False) -> dict:
    """The whole protocol (all eight datasets) for one 7B model: hours on one GPU and on 8 (its 40 jobs placed longest
    first on the least-loaded GPU), with the minutes of each part; with table=True the per-dataset table is printed."""
    jobs, parts = [], {"locate": 0.0, "train": 0.0, "eval": 0.0}
    if table:
        print("| dataset | locate prompt tokens | locate, min | steps per run | training-text tokens | HeadMap, min | "
              "LoRA, min | DoRA, min | evaluation (5 models), min |\n|---|---|---|---|---|---|---|---|---|")
    for name, rows in FULL_TRAIN.items():
        steps = math.ceil(rows / 16) * 2
        e = estimate(tok, name, rows, steps, rates, locate_scale)
        train = e["train"]
        parts["locate"] += e["locate"]
        parts["train"] += sum(train.values())
        parts["eval"] += e["evaluation"]
        jobs += [e["locate"] + train["headmap"], train["headmap-random"], train["lora"], train["dora"],
                 e["evaluation"]]
        if table:
            print(f"| {name} | {e['prompt_tokens']:.0f} | {e['locate'] / 60:.1f} | {steps:,} | {e['text_tokens']:.0f} | "
                  f"{train['headmap'] / 60:.0f} | {train['lora'] / 60:.0f} | {train['dora'] / 60:.0f} | "
                  f"{e['evaluation'] / 60:.1f} |")
    loads = [0.0] * 8
    for job in sorted(jobs, reverse=True):
        loads[loads.index(min(loads))] += job
    return {"one_gpu_hours": sum(parts.values()) / 3600, "eight_gpu_hours": max(loads) / 3600,
            **{f"{k}_minutes": v / 60 for k, v in parts.items()}}


def main():
    from cli.loading import load_tokenizer
    t = totals(load_tokenizer(), table=True)
    print(f"\none GPU: {t['one_gpu_hours']:.1f} h (locate {t['locate_minutes']:.0f} min, training "
          f"{t['train_minutes'] / 60:.1f} h, evaluation {t['eval_minutes']:.0f} min); 8 GPUs: {t['eight_gpu_hours']:.1f} h")


if __name__ == "__main__":
    main()
