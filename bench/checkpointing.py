"""Activation checkpointing and the chunked loss on this CPU, in one run: the peak resident memory and the seconds of
a HeadMap step on SmolLM2-135M (fp32, long rows in one micro-batch) plain, with --activation-checkpointing, and with
it and --loss-chunks 8, each in a fresh process of its own (a process's peak is its own), one after the other.

    python bench/checkpointing.py [--rows 4] [--length 1024] [--steps 2]
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--rows", type=int, default=4, help="rows of one batch (one micro-batch: the budget fits them all)")
p.add_argument("--length", type=int, default=1024, help="tokens a row")
p.add_argument("--steps", type=int, default=2, help="steps timed, after one of warm-up")
p.add_argument("--mode", choices=("plain", "checkpointed", "chunked"), help=argparse.SUPPRESS)  # the child's part
args = p.parse_args()

if args.mode is None:
    results = {}
    for mode in ("plain", "checkpointed", "chunked"):
        child = [sys.executable, __file__, "--mode", mode, "--rows", str(args.rows), "--length", str(args.length),
                 "--steps", str(args.steps)]
        done = subprocess.run(child, cwd=ROOT, capture_output=True, text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    plain = results["plain"]
    print(f"SmolLM2-135M, HeadMap on 2 heads of all 30 layers, {args.rows} rows x {args.length} tokens a step (fp32)")
    for mode, r in results.items():
        print(f"{mode:<13} {r['seconds']:6.2f} s a step   peak resident {r['peak_gib']:5.2f} GiB   losses {r['losses']}")
    for mode in ("checkpointed", "chunked"):
        r = results[mode]
        print(f"{mode} / plain: step time {r['seconds'] / plain['seconds']:.2f}x, peak memory "
              f"{r['peak_gib'] / plain['peak_gib']:.2f}x (less {plain['peak_gib'] - r['peak_gib']:.2f} GiB)")
    sys.exit(0)

sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from headmap.adapters import attach_headmap  # noqa: E402
from headmap.train import train_adapter  # noqa: E402
from cli.loading import load_model  # noqa: E402

model, _ = load_model("smollm2-135m", device="cpu", dtype="fp32", progress=False)
model.requires_grad_(False)
torch.manual_seed(0)
adapter = attach_headmap(model, {layer: [0, 1] for layer in range(30)}, rank=32)
adapter.train()
g = torch.Generator().manual_seed(0)
batches = []
for _ in range(args.steps + 1):
    ids = torch.randint(100, 40000, (args.rows, args.length), generator=g)
    batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
savers = dict(activation_checkpointing=args.mode != "plain", loss_chunks=8 if args.mode == "chunked" else 1)
budget = args.rows * args.length
losses, _ = train_adapter(model, adapter, batches[:1], steps=1, lr=1e-3, token_budget=budget, **savers)
started = time.perf_counter()
losses += train_adapter(model, adapter, batches[1:], steps=args.steps, lr=1e-3, token_budget=budget,
                        **savers).losses
seconds = (time.perf_counter() - started) / args.steps
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30  # KiB on Linux
print(json.dumps({"seconds": seconds, "peak_gib": peak, "losses": [round(x, 6) for x in losses]}))
