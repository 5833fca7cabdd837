"""What --report-to costs a training step, in one run: finetune.py's per-step reporting (loss, lr, grad_norm; a
validation loss every 10 steps) to TensorBoard, W&B (offline) and MLflow (its file store), against one HeadMap
step of SmolLM2-135M on the CPU at the protocol's batch of 16 ARC-Easy rows.

    python bench/report_to.py [--steps 3] [--reports 300]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--steps", type=int, default=3, help="HeadMap steps timed (after one of warm-up)")
p.add_argument("--reports", type=int, default=300, help="steps reported, per tracker")
args = p.parse_args()

import torch  # noqa: E402

from data.scoring import pad_id_of  # noqa: E402
from data.training import epoch_batches, training_texts
from data.tasks import open_task  # noqa: E402
from headmap.adapters import attach_headmap  # noqa: E402
from headmap.train import train_adapter  # noqa: E402
from cli.loading import load_model  # noqa: E402
from cli.trackers import Reporter  # noqa: E402

model, tokenizer = load_model("smollm2-135m", device="cpu", dtype="fp32", progress=False)
model.requires_grad_(False)
adapter = attach_headmap(model, {layer: [0, 1] for layer in range(30)}, rank=32)
rows = open_task("arc_easy", "paper").examples("train", 16 * (args.steps + 1))
batches = list(epoch_batches(training_texts(tokenizer, rows, 512), pad_id_of(tokenizer), 16, 1, 0))
train_adapter(model, adapter, batches[:1], steps=1, lr=1e-3)  # warm-up
started = time.perf_counter()
train_adapter(model, adapter, batches[1:], steps=args.steps, lr=1e-3)
step = (time.perf_counter() - started) / args.steps

with tempfile.TemporaryDirectory() as tmp:
    os.environ |= {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": f"file:{tmp}/mlruns",
                   "MLFLOW_ALLOW_FILE_STORE": "true"}
    print(f"one HeadMap step (SmolLM2-135M, batch 16, CPU, {torch.get_num_threads()} threads): {step:.2f} s")
    for name in ("tensorboard", "wandb", "mlflow"):
        reporter = Reporter([name], os.path.join(tmp, name), "bench", {"lr": 1e-3, "method": "headmap"})
        started = time.perf_counter()
        for s in range(1, args.reports + 1):
            entry = {"step": s, "loss": 2.0 / s, "lr": 1e-3, "grad_norm": 0.5, "seconds": float(s)}
            if s % 10 == 0:
                entry["val_loss"] = 2.1 / s
            reporter.log(entry, s)
        each = (time.perf_counter() - started) / args.reports
        reporter.close()
        print(f"{name:<12} {each * 1e3:7.2f} ms a step reported = {100 * each / step:.3f}% of a step")
