"""Where a training step's time goes: HeadMap's against LoRA's, under torch.profiler, in one run.

    python bench/step_profile.py                    # CPU: SmolLM2-135M's shape, random weights
    python bench/step_profile.py --shape llama2-7b  # a GPU: the 7B shape in bf16 (bench/gpu.sh runs it)

One step = headmap.train.batch_loss with backward (micro-batches within the token budget), clipping and AdamW, as
train_adapter runs it, on a batch of 16 rows of ARC-Easy training-text lengths (bench/lengths.json). Two untimed
steps first, then --steps profiled. Prints each method's seconds per step and its top operators by self time, and
writes them as JSON (--out): the operators that HeadMap adds over the frozen model's own forward and backward are
the ones to remove.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cli.arguments import add_out_arguments  # noqa: E402
from cli.exits import run_script
from cli.json_records import write_json  # noqa: E402
from cli.outputs import check_writable

SMOLLM2 = dict(layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536, vocab=49152)
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--shape", default="smollm2-135m", help="smollm2-135m, llama2-7b or llama3-8b")
p.add_argument("--steps", type=int, default=2)
p.add_argument("--top", type=int, default=12)
p.add_argument("--dry-run", action="store_true", help="a tiny model (2 layers; the 7B shapes' dry-run sizes), 24-token "
               "rows: checks the script")
add_out_arguments(p, "the profile as JSON")
args = p.parse_args()
if args.out:
    run_script(lambda: check_writable(args.out, args.overwrite))
import torch  # noqa: E402

from bench.shapes import DRY_RUN_SHAPES, SHAPES, random_llama  # noqa: E402
from data.training import lm_batch  # noqa: E402
from headmap.adapters import attach_headmap, attach_lora  # noqa: E402
from headmap.train import batch_loss  # noqa: E402

cuda = torch.cuda.is_available() and not args.dry_run
device = "cuda" if cuda else "cpu"
shape = SMOLLM2 if args.shape == "smollm2-135m" else (DRY_RUN_SHAPES if args.dry_run else SHAPES)[args.shape]
model = random_llama(shape, torch.bfloat16 if cuda else torch.float32, device, layers=2 if args.dry_run else None)
lengths = json.loads((ROOT / "bench" / "lengths.json").read_text())["arc_easy_train"][:16]
g = torch.Generator().manual_seed(2)
batch = lm_batch([torch.randint(3, shape["vocab"], (min(n, 24) if args.dry_run else n,), generator=g).tolist()
                  for n in lengths], 0)
n_keep = max(1, round(shape["heads"] / 4))
circuit = {layer: list(range(n_keep)) for layer in range(model.config.num_hidden_layers)}


def step(adapter, optimizer):
    batch_loss(model, batch, 4096, backward=True)
    torch.nn.utils.clip_grad_norm_(list(adapter.parameters()), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()


results = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
           "shape": args.shape, "tokens_per_step": int(batch["attention_mask"].sum())}
for method in ("headmap", "lora"):
    torch.manual_seed(0)
    adapter = attach_headmap(model, circuit, 32) if method == "headmap" else attach_lora(model, 32, 64, 0.05)
    adapter.train()
    params = list(adapter.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=cuda or None)
    for _ in range(2):
        step(adapter, optimizer)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step(adapter, optimizer)
    seconds = (time.perf_counter() - start) / args.steps
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:args.top]
    results[method] = {"seconds_per_step": seconds, "trainable": sum(p.numel() for p in params),
                       "top": [{"op": e.key, "calls": e.count, "ms_per_step": getattr(e, key) / 1e3 / args.steps}
                               for e in events]}
    print(f"\n{method}: {seconds:.3f} s per step (profiled), {results[method]['trainable']:,} trainable parameters")
    for e in results[method]["top"]:
        print(f"  {e['ms_per_step']:9.2f} ms  {e['calls'] // args.steps:6d} calls  {e['op']}")
    adapter.remove()
results["headmap_over_lora"] = results["headmap"]["seconds_per_step"] / results["lora"]["seconds_per_step"]
print(f"\nHeadMap step / LoRA step: {results['headmap_over_lora']:.2f} on {results['device']}")
if args.out:
    write_json(args.out, results)
