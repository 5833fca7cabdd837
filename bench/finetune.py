"""Training step of HeadMap, LoRA and DoRA: one padded pass per batch (the old loop) vs length-sorted micro-batches
(finetune.py now), the same batches, one run. Prints s/step of both, the ratio, the loss of both and peak memory.

    python bench/finetune.py --heads heads.json [--dataset piqa]

Peak memory: on a GPU torch's peak allocation; on a CPU the process's peak resident set, reset before each
measurement through /proc/self/clear_refs (Linux).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

import finetune  # noqa: E402
from data import scoring  # noqa: E402
from data.scoring import length_groups, pad_id_of, pad_right, pass_overhead_tokens  # noqa: E402
from data.tasks import default_data_dir, load_examples  # noqa: E402
from kernels.adapters import attach_headmap, attach_lora  # noqa: E402
from kernels.circuit import read_circuit  # noqa: E402
from kernels.model import DEFAULT_MODEL, load_model  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--heads", required=True)
p.add_argument("--model", default=DEFAULT_MODEL)
p.add_argument("--dataset", default="arc_easy")
p.add_argument("--prompt", default="paper")
p.add_argument("--steps", type=int, default=10)
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--token-budget", type=int, default=4096)
p.add_argument("--methods", default="headmap-mha,headmap-hs,lora,dora")
p.add_argument("--pass-overhead", type=int, help="tune data.scoring.PASS_OVERHEAD_TOKENS for this device "
               "(default: its value)")
p.add_argument("--device", default="auto")
p.add_argument("--data-dir", default=default_data_dir())
args = p.parse_args()
model, tok = load_model(args.model, args.device)
model.requires_grad_(False)
device = next(model.parameters()).device
if args.pass_overhead is not None:
    scoring.PASS_OVERHEAD_TOKENS[device.type] = args.pass_overhead
pad = pad_id_of(tok)
examples = load_examples(args.dataset, "train", args.prompt, args.data_dir)
order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()  # random batches, as in training
seqs = finetune.tokenize(tok, [examples[i] for i in order[:args.steps * args.batch_size]], 512)
batches = [seqs[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.steps)]
useful = sum(len(s) for b in batches for s in b)
one_pass = sum(len(b) * max(map(len, b)) for b in batches)
overhead = pass_overhead_tokens(device)
micro = sum(len(g) * max(len(b[i]) for i in g)
            for b in batches for g in length_groups(list(map(len, b)), args.token_budget, overhead))
print(f"{args.dataset} {args.prompt} prompts, batch {args.batch_size}: useful / padded tokens = {useful / one_pass:.2f} "
      f"in one pass, {useful / micro:.2f} in micro-batches (--token-budget {args.token_budget}, "
      f"pass overhead {overhead} tokens)")
circuit = read_circuit(args.heads)
ATTACH = {"headmap-mha": lambda: attach_headmap(model, circuit, 32, 1.0, "mha"),
          "headmap-hs": lambda: attach_headmap(model, circuit, 32, 1.0, "hs"),
          "lora": lambda: attach_lora(model, 32, 64, 0.05), "dora": lambda: attach_lora(model, 32, 64, 0.05, dora=True)}


def padded_step(batch):
    """The loop before 2026-11-25: one right-padded pass over the whole batch, the shifted logits sliced."""
    ids, mask = pad_right(batch, pad, device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=ids, attention_mask=mask).logits
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum")
    n = int((labels != -100).sum())
    (nll / n).backward()
    return nll.item() / n


def micro_step(batch):
    return finetune.batch_loss(model, batch, pad, args.token_budget, backward=True)


def reset_peak():
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_gib():
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 2**20


def run(method, step):
    """Mean s/step (first step left out: allocator warm-up), mean loss, peak memory."""
    torch.manual_seed(0)
    adapter = ATTACH[method]()
    adapter.train()
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-4, weight_decay=0.0)
    reset_peak()
    times, losses = [], []
    for batch in batches:
        start = time.perf_counter()
        losses.append(step(batch))
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    adapter.remove()
    return sum(times[1:]) / len(times[1:]), sum(losses) / len(losses), peak_gib()


where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
print(f"{args.model} on {where}, {args.steps} steps per path")
print(f"{'method':<13}{'padded s/step':>14}{'micro s/step':>13}{'speed-up':>10}{'padded loss':>13}{'micro loss':>12}"
      f"{'padded peak':>13}{'micro peak':>12}")
for method in args.methods.split(","):
    t_pad, l_pad, m_pad = run(method, padded_step)
    t_mic, l_mic, m_mic = run(method, micro_step)
    print(f"{method:<13}{t_pad:>14.2f}{t_mic:>13.2f}{t_pad / t_mic:>9.2f}x{l_pad:>13.4f}{l_mic:>12.4f}"
          f"{m_pad:>9.2f} GiB{m_mic:>8.2f} GiB", flush=True)
