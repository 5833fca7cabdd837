"""locate and fine-tuning at the paper's scale, on one GPU: random-weight models of LLaMA-2-7B and LLaMA-3-8B shape,
bf16, samples of real token lengths. Needs torch, transformers, triton, peft and accelerate; no download.

    python bench/gpu_scale.py --out scale.json     # on a CUDA GPU: at most --budget seconds (default 330)
    python bench/gpu_scale.py --dry-run            # on a CPU: tiny shapes, the Triton interpreter (what CI runs)

1. locate, D = 64, 8 heads per layer, LLaMA-2-7B shape, on the token lengths of 64 ARC-Easy harness prompts with
   their gold answers (bench/lengths.json, SmolLM2's tokenizer; 34 tokens on average): wall time (warm: a first
   pass over the last layer compiles and tunes the kernel for every batch shape, and is timed apart), model
   TFLOP/s (the analytic FLOPs of every layer-run over the time) and MFU against the card's dense bf16 peak (989
   TFLOP/s on an H100 or H200 SXM; a measured 8192^3 bf16 matmul is printed beside it);
2. one training step of HeadMap, LoRA and DoRA (finetune.py's) against PEFT + Trainer with the same rows and with
   batches grouped by length (bench/step_vs_peft_trainer.py), batch 16, bf16, ARC-Easy training-text lengths;
3. the naive loop (one full stock forward per candidate, SDPA, heads zeroed by o_proj pre-hooks) timed on a few
   candidates and projected to all D x H x L of them;
4. bf16 against fp32 (TF32 off): the same random 4-layer model of 7B width, located in both; each head where the
   circuits differ, and whether the fp32 loss gap behind it lies within the bf16 run's own error;
5. locate on BoolQ harness lengths (151 tokens on average) and on the LLaMA-3-8B shape, each until its share of the
   budget runs out; the layers not run are projected from the measured rate.
Each section's results are written to --out as soon as it ends; a section that fails is recorded and skipped.
"""
import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cli.arguments import add_out_arguments  # noqa: E402  (cli imports no torch)
from cli.exits import run_script
from cli.json_records import write_json  # noqa: E402
from cli.outputs import check_writable

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--dry-run", action="store_true", help="CPU: Triton's interpreter and tiny shapes (what CI runs)")
add_out_arguments(p, "where to write the results as JSON (after every section)", "scale.json")
p.add_argument("--budget", type=float, default=330, help="seconds for the whole run; partial locates stop at it")
p.add_argument("--sections", help="run only these sections (comma-separated names, as in the JSON)")
args = p.parse_args()
if args.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is defined, so before headmap/ is imported

run_script(lambda: check_writable(args.out, args.overwrite))  # this run's own sections then replace it
import torch  # noqa: E402

import bench.shapes  # noqa: E402
from bench.step_vs_peft_trainer import compare, ours  # noqa: E402
from bench.shapes import DRY_RUN_SHAPES, SHAPES  # noqa: E402
from headmap.batching import pad_right  # noqa: E402
from headmap.locate import default_token_budget, locate_circuit  # noqa: E402

if not args.dry_run and not torch.cuda.is_available():
    sys.exit("error: no CUDA GPU here; run with --dry-run to check the script on a CPU")
DEVICE = "cpu" if args.dry_run else "cuda"
DTYPE = torch.float32 if args.dry_run else torch.bfloat16
PEAK = 989e12  # dense bf16 FLOP/s of an H100 / H200 SXM (datasheet)
START = time.time()
DEADLINE = START + args.budget
SHAPES = DRY_RUN_SHAPES if args.dry_run else SHAPES
LENGTHS = json.loads((ROOT / "bench" / "lengths.json").read_text())
D, N_KEEP = (3, 1) if args.dry_run else (64, 8)
results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)",
           "versions": {"torch": torch.__version__}, "budget_s": args.budget}


def save():
    results["elapsed_s"] = time.time() - START
    write_json(args.out, results)


def lengths_of(name):
    lengths = LENGTHS[name][:D]
    return [min(n, 12) for n in lengths] if args.dry_run else lengths


def section(name):
    """Run the decorated function now; record its result, or its error, under `name`."""
    def run(fn):
        if args.sections and name not in args.sections.split(","):
            return
        print(f"\n== {name} ({time.time() - START:.0f} s in)", flush=True)
        try:
            results[name] = fn()
        except Exception as err:  # one failed section must not lose the others' numbers
            traceback.print_exc()
            results[name] = {"error": f"{type(err).__name__}: {err}"}
        save()
    return run


def random_llama(shape, dtype, layers=None):
    return bench.shapes.random_llama(shape, dtype, DEVICE, layers, init_range=0.2 if args.dry_run else 0.02)


def samples_of(lengths, vocab):
    """D as locate_circuit takes it: random tokens of the given lengths, the last token the gold answer."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(3, vocab, (n,), generator=g), n - 1) for n in lengths]


def layer_flops(shape, lengths, layers=None):
    """FLOPs locate spends on each layer's candidates: H x D rows, each running the layers from l up, each
    layer-run 2 x its weights per token plus causal attention's 2 n^2 hidden."""
    layers = layers or shape["layers"]
    hidden, head_dim = shape["hidden"], shape["hidden"] // shape["heads"]
    weights = hidden * (2 * hidden + 2 * shape["kv_heads"] * head_dim) + 3 * hidden * shape["intermediate"]
    per_run = sum(2 * n * weights + 2 * n * n * hidden for n in lengths)
    return [(layers - l) * shape["heads"] * per_run for l in range(layers)]


class OutOfTime(Exception):
    pass


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed_locate(model, shape, samples, budget_tokens, stop_at=None, layers=None):
    """A warm-up over the last layer (every batch shape compiled and tuned), then locate from layer 0 until done
    or `stop_at`; per-layer times, rate, MFU, and the projection of the layers not run."""
    layers = layers or shape["layers"]
    heads = shape["heads"]
    flops = layer_flops(shape, [len(ids) for ids, _ in samples], layers)
    warm = {"circuit": {str(l): list(range(N_KEEP)) for l in range(layers - 1)},
            "loss_matrix": [[0.0] * heads for _ in range(layers - 1)]}
    sync()
    start = time.perf_counter()
    locate_circuit(model, samples, N_KEEP, budget_tokens, state=warm)
    warm_up = time.perf_counter() - start
    state, ends = {"circuit": {}, "loss_matrix": []}, []

    def on_layer(state):  # after the layer's ranking, which waited for the GPU
        ends.append(time.perf_counter() - start)
        if stop_at is not None and time.time() > stop_at and len(ends) < layers:
            raise OutOfTime
    sync()
    start = time.perf_counter()
    try:
        locate_circuit(model, samples, N_KEEP, budget_tokens, on_layer, state)
    except OutOfTime:
        pass
    done = len(ends)
    rate = sum(flops[:done]) / ends[-1]
    out = {"layers_run": done, "layers": layers, "seconds": ends[-1], "warm_up_seconds": warm_up,
           "projected_seconds": ends[-1] + sum(flops[done:]) / rate, "total_flops": sum(flops),
           "tflops": rate / 1e12, "mfu": rate / PEAK, "layer_seconds": [b - a for a, b in zip([0] + ends, ends)],
           "token_budget": budget_tokens, "circuit": state["circuit"], "loss_matrix": state["loss_matrix"]}
    print(f"  {done}/{layers} layers in {ends[-1]:.1f} s (warm-up {warm_up:.1f} s); whole locate "
          f"{'measured' if done == layers else 'projected'} {out['projected_seconds']:.1f} s; "
          f"{out['tflops']:.0f} TFLOP/s = {100 * out['mfu']:.1f}% of {PEAK / 1e12:.0f}", flush=True)
    return out


print(f"{results['device']}, torch {torch.__version__}, budget {args.budget:.0f} s")
if DEVICE == "cuda":
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    import triton.testing
    ms = triton.testing.do_bench(lambda: a @ b, warmup=20, rep=100, return_mode="median")
    results["matmul_tflops"] = 2 * 8192 ** 3 / ms / 1e9
    print(f"bf16 8192^3 matmul: {results['matmul_tflops']:.0f} TFLOP/s (datasheet dense peak {PEAK / 1e12:.0f})")
    del a, b
shape7 = SHAPES["llama2-7b"]
model = random_llama(shape7, DTYPE)
arc = samples_of(lengths_of("arc_easy_locate"), shape7["vocab"])
BUDGET_TOKENS = default_token_budget(torch.device(DEVICE))


@section("locate_7b_arc")
def _():
    return timed_locate(model, shape7, arc, BUDGET_TOKENS, stop_at=START + 0.45 * args.budget)


@section("finetune_7b")
def _():
    lengths = LENGTHS["arc_easy_train"][:16 * (2 if args.dry_run else 6)]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, shape7["vocab"], (min(n, 24) if args.dry_run else n,), generator=g).tolist()
            for n in lengths]
    batches = [seqs[i:i + 16] for i in range(0, len(seqs), 16)]
    circuit = {layer: list(range(N_KEEP)) for layer in range(shape7["layers"])}
    print(f"  batch 16, {sum(map(len, seqs)) / len(seqs):.0f} tokens a row on average, {len(batches)} steps each")
    ours(model, "lora", batches, 0)  # untimed: every batch shape's first-use costs (kernels, workspaces) paid once
    return compare(model, batches, 0, circuit, log=lambda line: print(line, flush=True))


@section("naive_7b_arc")
def _():
    heads, layers = shape7["heads"], shape7["layers"]
    head_dim = shape7["hidden"] // heads
    ids, attention = pad_right([seq.tolist() for seq, _ in arc], 0, DEVICE)  # right padding
    pos = torch.tensor([start - 1 for _, start in arc], device=DEVICE)
    target = torch.tensor([seq[-1].item() for seq, _ in arc], device=DEVICE)

    def candidate(layer, head):  # the naive loop's unit of work: a full forward with one more head zeroed
        def zero(module, inputs):
            x = inputs[0].clone()
            x[..., head * head_dim:(head + 1) * head_dim] = 0
            return (x,)
        hook = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(zero)
        try:
            with torch.inference_mode():
                logp = torch.log_softmax(model(ids, attention_mask=attention).logits.float(), -1)
                return -logp[torch.arange(len(pos), device=DEVICE), pos, target].sum().item()
        finally:
            hook.remove()
    candidate(0, 0)
    sync()
    start = time.perf_counter()
    k = 2 if args.dry_run else 4
    for h in range(k):
        candidate(0, h)
    per = (time.perf_counter() - start) / k
    projected = per * heads * layers
    print(f"  {per:.3f} s per candidate x {heads * layers} candidates = {projected:.0f} s projected", flush=True)
    return {"seconds_per_candidate": per, "candidates_timed": k, "projected_seconds": projected}


@section("bf16_vs_fp32")
def _():
    torch.backends.cuda.matmul.allow_tf32 = False
    layers = 4 if not args.dry_run else 2
    runs = {}
    for name, dtype in [("bf16", torch.bfloat16), ("fp32", torch.float32)]:
        small = random_llama(shape7, dtype, layers=layers)
        runs[name] = timed_locate(small, shape7, arc, BUDGET_TOKENS, layers=layers)
        del small
    c16, c32 = runs["bf16"]["circuit"], runs["fp32"]["circuit"]
    l16, l32 = (torch.tensor(runs[n]["loss_matrix"]) for n in ("bf16", "fp32"))
    differences = []
    for layer in range(layers):
        only16 = sorted(set(c16[str(layer)]) - set(c32[str(layer)]))
        only32 = sorted(set(c32[str(layer)]) - set(c16[str(layer)]))
        error = (l16[layer] - l32[layer]).abs().max().item()  # the bf16 run's own error on this layer's losses
        for h16, h32 in zip(only16, only32):
            gap = (l32[layer, h32] - l32[layer, h16]).item()  # how much more fp32 says h32 hurts
            differences.append({"layer": layer, "bf16_head": h16, "fp32_head": h32, "fp32_gap": gap,
                                "bf16_error": error, "near_tie": gap <= error})
    total = sum(len(v) for v in c32.values())
    print(f"  {len(differences)} of {total} circuit heads differ; near ties: "
          f"{sum(d['near_tie'] for d in differences)}", flush=True)
    for d in differences:
        print(f"    layer {d['layer']}: bf16 head {d['bf16_head']}, fp32 head {d['fp32_head']}, fp32 loss gap "
              f"{d['fp32_gap']:.4f}, bf16 error {d['bf16_error']:.4f}")
    return {"layers": layers, "heads_differing": len(differences), "circuit_heads": total, "differences": differences,
            "bf16_seconds": runs["bf16"]["seconds"], "fp32_seconds": runs["fp32"]["seconds"],
            "mean_abs_loss_difference": (l16 - l32).abs().mean().item(), "mean_loss": l32.mean().item()}


@section("locate_7b_boolq")
def _():
    boolq = samples_of(lengths_of("boolq_locate"), shape7["vocab"])
    return timed_locate(model, shape7, boolq, BUDGET_TOKENS, stop_at=START + 0.8 * args.budget)


del model
if DEVICE == "cuda":
    torch.cuda.empty_cache()


@section("locate_8b_arc")
def _():
    shape8 = SHAPES["llama3-8b"]
    model8 = random_llama(shape8, DTYPE)
    return timed_locate(model8, shape8, samples_of(lengths_of("arc_easy_locate"), shape8["vocab"]), BUDGET_TOKENS,
                        stop_at=DEADLINE)


failed = [name for name, value in results.items() if isinstance(value, dict) and "error" in value]
save()
print(f"\nwrote {args.out} after {time.time() - START:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed else "every section ran"))
sys.exit(1 if failed else 0)
