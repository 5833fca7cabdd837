"""One command that checks and times the masked-attention kernel on a GPU. Needs torch and triton only: random
inputs, no model, no download.

    python bench/gpu.py --out gpu.json        # on a CUDA GPU: about 4 minutes on an H100
    python bench/gpu.py --dry-run             # on a CPU: the same checks through Triton's interpreter, tiny shapes

0. every kernel variant compiled ahead by parallel processes (into Triton's on-disk cache, which
   bench/gpu_scale.py then finds too);
1. exactness against the reference (masked_attention_reference in fp32 on the same rounded inputs), in fp32,
   fp16 and bf16: everything a model hands the kernel: plain causal attention, grouped-query layouts, a key/value
   cache offset, right and left padding, sliding windows, per-head windows, soft-capping, a mask with holes (read
   densely); in bf16 at head_dim 128 with every tile configuration the tuner may pick. Masked heads must be
   exactly zero, and every output element written (a second run into a freed NaN-filled block must agree);
2. throughput against SDPA's flash and cuDNN backends, compiled FlexAttention and SDPA with an explicit mask
   (bench/kernel_vs_sdpa.py, whose docstring defines the columns).
Prints a table, writes JSON (--out), and exits 1 if any check fails. bench/gpu_scale.py times locate and
fine-tuning at 7B scale.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli.arguments import add_out_arguments  # noqa: E402  (cli imports no torch)
from cli.exits import run_script
from cli.json_records import write_json  # noqa: E402
from cli.outputs import check_writable

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU: Triton's interpreter and tiny shapes (what CI runs)")
    add_out_arguments(p, "where to write the results as JSON", "gpu.json")
    p.add_argument("--budget", type=float, default=170, help="seconds for the throughput table; cases left are skipped")
    p.add_argument("--grid", choices=("table", "claims"), default="table", help="the throughput table's cases "
                   "(bench/kernel_vs_sdpa.py --grid; bench/gpu.sh asks for claims)")
    ARGS = p.parse_args()
    if ARGS.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is defined, so before headmap/ is imported
    run_script(lambda: check_writable(ARGS.out, ARGS.overwrite))  # one line, exit 2
import torch  # noqa: E402

from bench.kernel_vs_sdpa import FRACTIONS, HEADER, cases_for, measure  # noqa: E402
from headmap.attention import masked_attention_reference, masked_attention_triton, tiles_for  # noqa: E402

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # no Triton: nothing can run out of shared memory
    OutOfResources = RuntimeError

TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}  # max |error| against fp32


def model_mask(batch, q_len, k_len, device, window=None, right=None, left=None, holes=None):
    """(batch, 1, q_len, k_len) bool, True = attend: causal (query i at key i + k_len - q_len), within `window`,
    keys before `right[b]` and from `left[b]` on (padding), and for `holes` (a generator) a random fifth of the keys
    hidden."""
    pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=device)[None, :]
    mask = (j <= pos) & ((j > pos - window) if window else True)
    mask = mask.expand(batch, q_len, k_len).clone()
    if right is not None:
        mask &= j[None] < right[:, None, None]
    if left is not None:
        mask &= j[None] >= left[:, None, None]
    if holes is not None:
        mask &= torch.rand(batch, q_len, k_len, generator=holes, device=device) > 0.2
    return mask[:, None]


# the kernel's compiled variants: which of the key ranges, dense mask and soft-cap paths they take
VARIANTS = {"plain": {}, "ranges": {"window": 5}, "dense": {"holes": True}, "ranges, softcap": {"window": 5, "softcap": 30.0}}


def compile_one(job):
    """Compile (and run once) one kernel variant on tiny inputs, into Triton's on-disk cache."""
    dtype, head_dim, variant, tile = job
    opt = VARIANTS[variant]
    q = torch.randn(1, 4, 32, head_dim, device="cuda", dtype=getattr(torch, dtype))
    k, v = torch.randn_like(q[:, :2]), torch.randn_like(q[:, :2])
    holes = torch.Generator(device="cuda").manual_seed(0) if opt.get("holes") else None
    mask = model_mask(1, 32, 32, "cuda", opt.get("window"), holes=holes) if set(opt) - {"softcap"} else None
    masked_attention_triton(q, k, v, None, None, mask, opt.get("softcap"), tile=tile)
    torch.cuda.synchronize()


def compile_all():
    """Every kernel variant this script and bench/gpu_scale.py run, compiled by up to 15 processes at once rather
    than one at a time inside the timed sections (each takes seconds; there are about a hundred)."""
    import concurrent.futures
    import multiprocessing
    jobs = [(dtype, d, variant, tile) for dtype in ("bfloat16", "float16", "float32") for d in (64, 128, 256)
            for variant in VARIANTS for tile in tiles_for(d) if d < 256 or (dtype == "bfloat16" and variant != "dense")]
    start = time.time()
    try:
        with concurrent.futures.ProcessPoolExecutor(min(15, os.cpu_count() or 1),
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            errors = [f.exception() for f in [pool.submit(compile_one, job) for job in jobs] if f.exception()]
    except Exception as err:  # no worker processes here: every variant compiles when first run instead
        errors = [err]
    print(f"0. compiled {len(jobs)} kernel variants in {time.time() - start:.0f} s"
          + (f"; {len(errors)} not compiled ahead (they compile when first run): {errors[0]}" if errors else ""),
          flush=True)


def cases(dry_run):
    """(name, batch, heads, kv heads, queries, keys, options): full shapes on the GPU, tiny ones in the interpreter."""
    s, c = (40, 12) if dry_run else (300, 16)
    k = 2 * s if dry_run else 400
    return {"causal, GQA 4:1": (3, 8, 2, s, s, {}),
            "causal, MHA": (2, 4, 4, s, s, {}),
            "KV cache offset": (2, 8, 2, c, k, {}),
            "right padded": (3, 8, 2, s, s, {"right": True}),
            "left padded": (3, 8, 2, s, s, {"left": True}),
            "window, left padded": (3, 8, 2, s, s, {"window": 37, "left": True}),
            "cache, window, left padded": (3, 8, 2, c, k, {"window": 37, "left": True}),
            "softcap 30, window": (2, 8, 2, s, s, {"window": 37, "softcap": 30.0}),
            "per-head windows": (2, 4, 2, s, s, {"per_head": True}),
            "mask with holes (dense)": (2, 4, 2, s, s, {"holes": True})}


def plan(dry_run):
    """(dtype, head_dim, case names, tiles): every case and tile where models run (bf16, head_dim 128), the rest
    sampled with the first tile, so that the compiled variants stay few."""
    names = list(cases(dry_run))
    rows = [(torch.bfloat16, 128, names),
            (torch.bfloat16, 64, ["causal, GQA 4:1", "left padded", "softcap 30, window"]),
            (torch.float16, 128, ["causal, MHA", "window, left padded", "mask with holes (dense)"]),
            (torch.float16, 64, ["KV cache offset", "right padded"]),
            (torch.float32, 64, ["causal, GQA 4:1", "cache, window, left padded", "softcap 30, window"]),
            (torch.float32, 128, ["right padded", "per-head windows"]),
            (torch.bfloat16, 256, ["causal, GQA 4:1", "left padded"])]
    if dry_run:  # the interpreter: small heads, one tile; every case once in bf16, one in each other dtype
        return [(torch.bfloat16, 32, names, tiles_for(128)), (torch.float16, 16, names[2:3], tiles_for(64)),
                (torch.float32, 32, names[-1:], tiles_for(128))]
    return [(dtype, d, n, tiles_for(d) if (dtype, d) == (torch.bfloat16, 128) else tiles_for(d)[:1])
            for dtype, d, n in rows]


@torch.no_grad()
def check(dtype, head_dim, name, tile, device, g, dry_run) -> dict:
    """One exactness case: the kernel with `tile` against the fp32 reference."""
    batch, heads, kv, q_len, k_len, opt = cases(dry_run)[name]
    q = torch.randn(batch, heads, q_len, head_dim, generator=g, device=device).to(dtype)
    k = torch.randn(batch, kv, k_len, head_dim, generator=g, device=device).to(dtype)
    v = torch.randn(batch, kv, k_len, head_dim, generator=g, device=device).to(dtype)
    if "softcap" in opt:
        q = q * 4  # scores large enough for the cap to bite
    head_mask = torch.rand(batch, heads, generator=g, device=device) < 0.4  # a different head set per row
    lengths = torch.randint(k_len // 3, k_len + 1, (batch,), generator=g, device=device)
    mask = None
    if opt.get("per_head"):
        mask = torch.cat([model_mask(batch, q_len, k_len, device, window=w) for w in (5, 17, 64, None)][:heads], 1)
    elif set(opt) - {"softcap"}:
        mask = model_mask(batch, q_len, k_len, device, opt.get("window"), lengths if opt.get("right") else None,
                          k_len - lengths if opt.get("left") else None, g if opt.get("holes") else None)
    tiles = "x".join(str(tile[k]) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages") if k in tile)
    case = f"{str(dtype)[6:]} d{head_dim} {name} (b{batch} h{heads}/kv{kv} q{q_len} k{k_len}) tile {tiles}"
    ref = masked_attention_reference(q.float(), k.float(), v.float(), head_mask, None, mask, opt.get("softcap"))
    try:
        out = masked_attention_triton(q, k, v, head_mask, None, mask, opt.get("softcap"), tile=tile)
    except OutOfResources:  # a tile too large for this variant: the tuner skips it the same way
        return {"case": case, "skipped": "tile exceeds shared memory", "ok": True, "max_error": 0.0}
    poison = torch.empty_like(out).fill_(float("nan"))  # its block is what the allocator hands the next output
    del poison
    again = masked_attention_triton(q, k, v, head_mask, None, mask, opt.get("softcap"), tile=tile)
    err = (out.float() - ref).abs().max().item()
    zero = bool((out.transpose(1, 2)[head_mask] == 0).all())
    ok = err <= TOLERANCE[dtype] and zero and bool(torch.equal(out, again)) and bool(torch.isfinite(out).all())
    return {"case": case, "max_error": err, "masked_zero": zero, "ok": ok}


def main(args):
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; run with --dry-run to check the script on a CPU")
    device = "cpu" if args.dry_run else "cuda"
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
               "versions": {"torch": torch.__version__}, "kernel": [], "throughput": []}
    print(results["device"], flush=True)
    if device == "cuda":
        compile_all()
    print("\n1. kernel vs reference (max |error| against fp32; masked heads must be exactly 0)", flush=True)
    g = torch.Generator(device=device).manual_seed(0)
    for dtype, head_dim, names, tiles in plan(args.dry_run):
        for tile in tiles:
            for name in names:
                row = check(dtype, head_dim, name, tile, device, g, args.dry_run)
                results["kernel"].append(row)
                verdict = row.get("skipped") or ("ok" if row["ok"] else "MISMATCH")
                print(f"  {row['case']:<90} error {row['max_error']:.1e}  {verdict}", flush=True)
    failures = [f"kernel {row['case']}" for row in results["kernel"] if not row["ok"]]
    print(f"\n2. throughput (bench/kernel_vs_sdpa.py; TFLOP/s counts every head's causal work)\n{HEADER}", flush=True)
    results["throughput"] = measure(device == "cuda", cases_for(args.dry_run, 16384, args.grid), FRACTIONS, args.budget,
                                    log=lambda line: print(line, flush=True))
    results["failures"] = failures
    write_json(args.out, results)
    print(f"\nwrote {args.out}; " + (f"FAILED: {', '.join(failures)}" if failures else "all checks passed"))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main(ARGS)
