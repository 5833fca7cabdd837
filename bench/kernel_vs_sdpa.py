"""The masked-attention kernel against what a kernel engineer would run instead, in one run.

    python bench/kernel_vs_sdpa.py                 # on a CUDA GPU: the full table (about 3 minutes on an H100)
    python bench/kernel_vs_sdpa.py --dry-run       # on a CPU: tiny shapes through Triton's interpreter (CI)

Baselines, each on the same q, k, v:
- `flash`, `cudnn`: torch SDPA with is_causal=True and no mask, forced to its FlashAttention-2 or cuDNN backend
  (`sdpa picks` says which one SDPA itself chooses). Neither can skip a head: their time is the same at any share
  of heads masked, and zeroing the masked heads afterwards costs one more pass.
- `flex`: FlexAttention, compiled, with a BlockMask that is causal and empty for the masked (row, head) pairs:
  PyTorch's own way to skip whole heads.
- `sdpa+mask`: SDPA given an explicit boolean mask, which is what transformers runs for a padded batch (PyTorch
  never takes its flash path when attn_mask is given). The kernel's `padded` column runs the same padded mask,
  which it reads as per-query key ranges.
TFLOP/s counts causal attention as FlashAttention's benchmark does: 4 * batch * heads * seq^2 * head_dim / 2,
over every head, masked or not, so a kernel that skips masked heads shows a higher effective rate.
Time: the median of CUDA-event timings (triton.testing.do_bench).
"""
import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cli.arguments import add_out_arguments  # noqa: E402  (cli imports no torch)
from cli.exits import run_script
from cli.json_records import write_json  # noqa: E402
from cli.outputs import check_writable


def options(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU: Triton's interpreter and tiny shapes (what CI runs)")
    p.add_argument("--tokens", type=int, default=16384, help="batch x sequence length of every case")
    p.add_argument("--budget", type=float, default=240, help="seconds; cases left when it runs out are skipped")
    p.add_argument("--grid", choices=("table", "claims"), default="table", help="table: bf16 and fp16, d 128 and 64, "
                   "512-4096 tokens, MHA and GQA; claims: bf16, d 64 and 128, 512-8192 tokens, MHA (bench/gpu.sh)")
    add_out_arguments(p, "write the table as JSON here")
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = options()
    if ARGS.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is defined, so before headmap/ is imported
    if ARGS.out:
        run_script(lambda: check_writable(ARGS.out, ARGS.overwrite))  # one line, exit 2
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from headmap.attention import masked_attention_triton  # noqa: E402


def bench_ms(fn, cuda: bool) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU; a few wall-clock runs on the CPU)."""
    if cuda:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    fn()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[0]


def sdpa_choice(q, k, v) -> str:
    """The backend SDPA picks for causal attention on these inputs."""
    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=True)).name.lower()
    except Exception:  # a private function: when it moves, say so rather than guess
        return "unknown"


def try_ms(fn, cuda):
    try:
        return bench_ms(fn, cuda)
    except Exception as err:  # a backend that does not take these inputs (cuDNN and GQA, say)
        return f"n/a ({type(err).__name__})"


def measure(cuda: bool, cases, fractions, budget: float, log=print) -> list[dict]:
    """Every (dtype, head_dim, seq, kv_heads) case of `cases` against the baselines, at each share of heads masked.
    Returns one row per case and share."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if cuda:
        for name in ("cache_size_limit", "recompile_limit"):  # one compiled flex per shape: no fall-back to eager
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        flex = torch.compile(flex_attention, dynamic=False)
    else:
        flex = flex_attention  # the interpreter's dry run: unfused, just to check the script
    device = "cuda" if cuda else "cpu"
    deadline = time.time() + budget
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for dtype, head_dim, seq, batch, heads, kv in cases:
        if time.time() > deadline:
            log(f"  time budget spent: skipping {dtype} d{head_dim} s{seq} kv{kv}")
            rows.append({"dtype": str(dtype)[6:], "head_dim": head_dim, "seq": seq, "kv_heads": kv, "skipped": True})
            continue
        q = torch.randn(batch, heads, seq, head_dim, generator=g, device=device).to(dtype)
        k = torch.randn(batch, kv, seq, head_dim, generator=g, device=device).to(dtype)
        v = torch.randn(batch, kv, seq, head_dim, generator=g, device=device).to(dtype)
        flops = 4 * batch * heads * seq * seq * head_dim / 2
        causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g, device=device)  # right padding
        padded = (causal & (torch.arange(seq, device=device) < lengths[:, None])[:, None, :])[:, None]
        base = {"dtype": str(dtype)[6:], "head_dim": head_dim, "seq": seq, "batch": batch, "heads": heads,
                "kv_heads": kv, "sdpa_picks": sdpa_choice(q, k, v) if cuda else "cpu", "flops": flops}
        with torch.no_grad():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION] if cuda else [SDPBackend.MATH]):
                base["flash_ms"] = try_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                  enable_gqa=True), cuda)
                if not isinstance(base["flash_ms"], float) and kv < heads:  # no GQA in this build's flash path:
                    k_all, v_all = (t.repeat_interleave(heads // kv, 1) for t in (k, v))  # its keys per query head
                    base["flash_ms"] = try_ms(lambda: F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True),
                                              cuda)
                    base["flash_note"] = "k/v expanded to every query head"
            if cuda:
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    base["cudnn_ms"] = try_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                      enable_gqa=True), cuda)
            def transformers_sdpa():  # with a mask, transformers repeats the key/value heads, then calls SDPA
                k_all, v_all = (t.repeat_interleave(heads // kv, 1) for t in (k, v))
                return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=padded)
            base["sdpa_mask_ms"] = bench_ms(transformers_sdpa, cuda)
            base["kernel_padded_ms"] = bench_ms(lambda: masked_attention_triton(q, k, v, None, None, padded), cuda)
            for fraction in fractions:
                n_masked = int(heads * fraction)  # the same share in every row, other heads in each
                head_mask = torch.rand(batch, heads, generator=g, device=device).argsort(-1) < n_masked

                def keep(b, h, q_idx, kv_idx):
                    return (q_idx >= kv_idx) & ~head_mask[b, h]
                block_mask = create_block_mask(keep, batch, heads, seq, seq, device=device)
                row = dict(base, masked=fraction)
                row["flex_ms"] = try_ms(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True), cuda)
                row["kernel_ms"] = bench_ms(lambda: masked_attention_triton(q, k, v, head_mask), cuda)
                rows.append(row)
                log(format_row(row))
    return rows


def tflops(row, key):
    ms = row.get(key)
    return f"{row['flops'] / ms / 1e9:7.0f}" if isinstance(ms, float) else f"{'n/a':>7}"


HEADER = (f"  {'dtype':<5}{'d':>4}{'seq':>6}{'kv':>4}{'masked':>7}{'picks':>7} | TFLOP/s: {'flash':>7}{'cudnn':>7}"
          f"{'flex':>7}{'kernel':>7} | {'kernel/flash':>12}{'kernel/flex':>12} | padded: {'sdpa+mask':>9}"
          f"{'kernel':>7}")


def format_row(row) -> str:
    def ratio(a, b):
        return f"{row[a] / row[b]:11.2f}x" if all(isinstance(row.get(x), float) for x in (a, b)) else f"{'n/a':>12}"
    return (f"  {row['dtype']:<5}{row['head_dim']:>4}{row['seq']:>6}{row['kv_heads']:>4}{row['masked']:>7.0%}"
            f"{row['sdpa_picks'][:6]:>7} | {'':>9}{tflops(row, 'flash_ms')}{tflops(row, 'cudnn_ms')}"
            f"{tflops(row, 'flex_ms')}{tflops(row, 'kernel_ms')} | {ratio('flash_ms', 'kernel_ms')}"
            f"{ratio('flex_ms', 'kernel_ms')} | {'':>8}{tflops(row, 'sdpa_mask_ms'):>9}{tflops(row, 'kernel_padded_ms')}")


def cases_for(dry_run: bool, tokens: int, grid: str = "table"):
    """(dtype, head_dim, seq, batch, heads, kv_heads): batch x seq = tokens, as in FlashAttention's benchmark."""
    if dry_run:
        return [(torch.float32, 16, 64, 2, 4, kv) for kv in (4, 2)]
    if grid == "claims":
        return [(torch.bfloat16, d, seq, max(1, tokens // seq), 32, 32) for d in (64, 128)
                for seq in (512, 1024, 2048, 4096, 8192)]
    return [(dtype, d, seq, max(1, tokens // seq), 32, kv) for dtype in (torch.bfloat16, torch.float16)
            for d in (128, 64) for seq in (512, 2048, 4096) for kv in (32, 8)]


FRACTIONS = (0.0, 0.25, 0.5, 0.75)

if __name__ == "__main__":
    cuda = not ARGS.dry_run
    if cuda and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; run with --dry-run to check the script on a CPU")
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu (Triton interpreter)'}, torch {torch.__version__}\n{HEADER}")
    rows = measure(cuda, cases_for(ARGS.dry_run, ARGS.tokens, ARGS.grid), FRACTIONS, ARGS.budget)
    if ARGS.out:
        write_json(ARGS.out, rows)
