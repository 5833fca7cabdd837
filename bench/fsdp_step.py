"""--fsdp's collective path timed on however many GPUs the machine has (bench/gpu.sh runs it; world size 1 on one
GPU still exercises the wrapping): a random-weight model of LLaMA-2-7B's width (--layers of its 32 decoder layers,
bf16) sharded with the scripts' own sharding.shard, then locate (D = 16 ARC-Easy harness lengths, 8 heads a layer)
and HeadMap training steps (batch 16 of ARC-Easy training-text lengths, 8 heads of every layer), each timed warm.

    torchrun --standalone --nproc_per_node "$(nvidia-smi -L | wc -l)" bench/fsdp_step.py --out fsdp.json
    torchrun --standalone --nproc_per_node 2 bench/fsdp_step.py --dry-run     # CPU, gloo, a tiny shape
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cli.arguments import add_out_arguments  # noqa: E402
from cli.exits import run_script
from cli.json_records import write_json  # noqa: E402
from cli.outputs import check_writable

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--dry-run", action="store_true", help="CPU: gloo, Triton's interpreter and a tiny shape (CI)")
p.add_argument("--layers", type=int, default=8, help="decoder layers of the 7B shape to build (all 32: --layers 32)")
p.add_argument("--steps", type=int, default=3, help="training steps timed after one untimed")
add_out_arguments(p, "where rank 0 writes the results as JSON", "fsdp.json")
args = p.parse_args()
if args.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is defined, so before headmap/ is imported
run_script(lambda: check_writable(args.out, args.overwrite) if os.environ.get("RANK", "0") == "0" else None)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.shapes import DRY_RUN_SHAPES, SHAPES, random_llama  # noqa: E402
from headmap import distributed  # noqa: E402
from headmap.adapters import attach_headmap  # noqa: E402
from headmap.batching import pad_right  # noqa: E402
from headmap.locate import locate_circuit  # noqa: E402
from headmap.train import batch_loss  # noqa: E402
from cli.loading import pick_device  # noqa: E402
from cli.torchrun import start_distributed
from cli.torchrun import shard, shard_sizes  # noqa: E402


def timed(fn):
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


DEVICE = pick_device("cpu" if args.dry_run else "cuda")
start_distributed(DEVICE, fsdp=True)
shape = DRY_RUN_SHAPES["llama2-7b"] if args.dry_run else SHAPES["llama2-7b"]
layers = shape["layers"] if args.dry_run else args.layers
dtype = torch.float32 if args.dry_run else torch.bfloat16
full = random_llama(shape, dtype, "cpu", layers=layers) if distributed.rank() == 0 else None
config = random_llama(shape, dtype, "meta", layers=layers).config if full is None else full.config
model, load_seconds = timed(lambda: shard(full, config, dtype, DEVICE))
full = None  # rank 0 frees its whole copy
lengths = json.loads((ROOT / "bench" / "lengths.json").read_text())
g = torch.Generator().manual_seed(0)
samples = [(torch.randint(3, shape["vocab"], (min(n, 12) if args.dry_run else n,), generator=g), (min(n, 12) if
            args.dry_run else n) - 1) for n in lengths["arc_easy_locate"][:16]]
heads = max(1, shape["heads"] // 4)
locate_circuit(model, samples[:2], heads, state={})  # warm: compiles and tunes the kernel for the batch shapes
(circuit, _), locate_seconds = timed(lambda: locate_circuit(model, samples, heads, state={}))
adapter = attach_headmap(model, {layer: list(range(8 if not args.dry_run else 1)) for layer in range(layers)},
                         rank=32).train()
texts = [torch.randint(3, shape["vocab"], (min(n, 16) if args.dry_run else n,), generator=g).tolist()
         for n in lengths["arc_easy_train"][:16]]
ids, mask = pad_right(texts, 0, "cpu")
batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
batch_loss(model, batch, 4096, backward=True)  # warm
_, step_seconds = timed(lambda: [batch_loss(model, batch, 4096, backward=True) for _ in range(args.steps)])
result = {"device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (gloo, Triton's interpreter)",
          "world": distributed.world(), "shape": "llama2-7b", "layers": layers, "load_seconds": load_seconds,
          "locate_seconds": locate_seconds, "locate_samples": len(samples), "circuit_heads":
          sum(map(len, circuit.values())), "step_seconds": step_seconds / args.steps,
          "step_tokens_per_s": int(mask.sum()) * args.steps / step_seconds, "sharding": shard_sizes(model)}
if distributed.rank() == 0:
    write_json(args.out, result)
    print(json.dumps(result, indent=1))
dist.barrier()
