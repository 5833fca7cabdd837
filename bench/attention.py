"""Masked-attention kernel vs torch SDPA (then masking) at LLaMA-2-7B shapes, 0/25/50% of heads masked.

    python bench/attention.py            # on a GPU: Triton kernel vs SDPA, bf16
Without a GPU it says so and times the CPU reference path on smaller shapes instead.
TFLOP/s counts the causal attention of every head (the work an unmasked computation does), so a masked
kernel that skips heads shows a higher effective rate.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from kernels.attention import masked_attention_reference, masked_attention_triton  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=16)
p.add_argument("--seq", type=int, default=512)
p.add_argument("--heads", type=int, default=32)
p.add_argument("--head-dim", type=int, default=128)
p.add_argument("--repeats", type=int, default=20)
args = p.parse_args()

cuda = torch.cuda.is_available()
if cuda:
    device, dtype = "cuda", torch.bfloat16
    print(f"device: {torch.cuda.get_device_name()}, bf16")
else:
    device, dtype = "cpu", torch.float32
    args.batch, args.seq, args.repeats = 2, 256, 3
    print("no GPU: the Triton kernel runs only on CUDA; timing the CPU reference path (fp32) on smaller shapes")


def bench(fn):
    fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.repeats):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.repeats


print(f"{'case':<22}{'masked':>8}{'sdpa ms':>10}{'TF/s':>8}{'kernel ms':>11}{'TF/s':>8}{'speed-up':>10}{'max err':>10}")
for kv_heads in (args.heads, 8):
    for fraction in (0.0, 0.25, 0.5):
        g = torch.Generator(device=device).manual_seed(0)
        shape = (args.batch, args.heads, args.seq, args.head_dim)
        q = torch.randn(shape, generator=g, device=device, dtype=dtype)
        k = torch.randn((args.batch, kv_heads, args.seq, args.head_dim), generator=g, device=device, dtype=dtype)
        v = torch.randn_like(k)
        n_masked = int(args.heads * fraction)  # the same fraction in every row, different heads per row
        order = torch.rand(args.batch, args.heads, generator=g, device=device).argsort(-1)
        mask = order < n_masked
        flops = 4 * args.batch * args.heads * args.seq * args.seq * args.head_dim / 2
        t_ref = bench(lambda: masked_attention_reference(q, k, v, mask))
        case = f"b{args.batch} h{args.heads}/kv{kv_heads} s{args.seq} d{args.head_dim}"
        if cuda:
            with torch.no_grad():
                t_ker = bench(lambda: masked_attention_triton(q, k, v, mask))
                err = (masked_attention_triton(q, k, v, mask).float() -
                       masked_attention_reference(q.float(), k.float(), v.float(), mask)).abs().max().item()
            print(f"{case:<22}{fraction:>8.0%}{t_ref * 1e3:>10.3f}{flops / t_ref / 1e12:>8.1f}"
                  f"{t_ker * 1e3:>11.3f}{flops / t_ker / 1e12:>8.1f}{t_ref / t_ker:>9.2f}x{err:>10.1e}")
        else:
            print(f"{case:<22}{fraction:>8.0%}{t_ref * 1e3:>10.1f}{flops / t_ref / 1e12:>8.3f}{'-':>11}{'-':>8}"
                  f"{'-':>10}{'-':>10}")
