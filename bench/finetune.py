"""Seconds per training step, peak memory and trainable parameters of HeadMap, LoRA and DoRA, one run.

    python bench/finetune.py --heads heads.json
"""
import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

import finetune  # noqa: E402
from data import default_data_dir, load_examples, pad_id_of  # noqa: E402
from kernels.adapters import attach_headmap, attach_lora  # noqa: E402
from kernels.circuit import read_circuit  # noqa: E402
from kernels.model import DEFAULT_MODEL, load_model  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--heads", required=True)
p.add_argument("--model", default=DEFAULT_MODEL)
p.add_argument("--dataset", default="arc_easy")
p.add_argument("--prompt", default="paper")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--device", default="auto")
p.add_argument("--data-dir", default=default_data_dir())
args = p.parse_args()

model, tok = load_model(args.model, args.device)
model.requires_grad_(False)
device = next(model.parameters()).device
examples = load_examples(args.dataset, "train", args.prompt, args.data_dir, args.steps * args.batch_size)
seqs = finetune.tokenize(tok, examples, 512)
circuit = read_circuit(args.heads)
total = sum(p.numel() for p in model.parameters())
where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
print(f"{args.model} on {where}, {args.dataset} {args.prompt} prompts, batch {args.batch_size}, {args.steps} steps")
print(f"{'method':<14}{'trainable':>12}{'% of model':>12}{'s/step':>9}{'peak memory':>14}")
for name, attach in [("headmap-mha", lambda: attach_headmap(model, circuit, 32, 1.0, "mha")),
                     ("headmap-hs", lambda: attach_headmap(model, circuit, 32, 1.0, "hs")),
                     ("lora", lambda: attach_lora(model, 32, 64, 0.05)),
                     ("dora", lambda: attach_lora(model, 32, 64, 0.05, dora=True))]:
    torch.manual_seed(0)
    adapter = attach()
    adapter.train()
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-4, weight_decay=0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        batch = seqs[step * args.batch_size:(step + 1) * args.batch_size]
        start = time.perf_counter()
        nll, n = finetune.lm_loss(model, batch, pad_id_of(tok), device, device.type == "cuda")
        (nll / n).backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    per_step = sum(times[2:]) / len(times[2:])  # the first steps warm up allocators and kernels
    peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda"
            else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB rss")
    trainable = sum(p.numel() for p in adapter.parameters())
    print(f"{name:<14}{trainable:>12,}{100 * trainable / total:>11.3f}%{per_step:>9.2f}{peak:>14}")
    adapter.remove()
