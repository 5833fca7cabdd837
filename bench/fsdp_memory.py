"""Memory per GPU of HeadMap fine-tuning with --fsdp, at LLaMA-2-7B, LLaMA-3-8B and LLaMA-3-70B shapes, for 1, 2, 8
and 16 ranks (docs/scaling.md's table). No GPU and no weights needed:

    python bench/fsdp_memory.py --out bench/results/fsdp_memory.json

- weights: the frozen model's bf16 parameters, counted on the meta device; FSDP2 keeps 1/world of them on each rank;
- gathered: what a rank holds whole while it computes, one decoder layer at a time (two: FSDP2 gathers the next
  layer while the current one runs) plus the root's parameters (embeddings, final norm, LM head);
- activations: the bytes autograd keeps for the backward pass of one micro-batch of --tokens tokens (finetune's
  --token-budget, 4096) with HeadMap on 8 heads of every layer, measured on the CPU by torch's saved-tensor hooks
  (real bf16 tensors, each counted once, the frozen weights left out) on models of the real width with one and
  with two decoder layers (their difference is one layer's share, the rest the embeddings', head's and loss's),
  at --measure tokens, scaled linearly to --tokens (SDPA's memory-efficient kernels keep no tokens x tokens
  matrix);
- the adapter, its gradients and AdamW's two moments in fp32 (whole on every rank);
- with --activation-checkpointing (finetune's default under --fsdp): what the same hooks count with the layers
  checkpointed (each layer's input, which the checkpoint saves, and what stays outside the layers: the final norm,
  the logits and the loss) and, at the peak, one layer's activations while it is recomputed in backward.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cli.arguments import add_out_arguments  # noqa: E402
from cli.exits import run_script
from cli.json_records import write_json  # noqa: E402
from cli.outputs import check_writable

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
add_out_arguments(p, "the table as JSON", "bench/results/fsdp_memory.json")
p.add_argument("--tokens", type=int, nargs="+", default=[4096, 1024], help="tokens of one micro-batch "
               "(finetune's --token-budget): one table each")
p.add_argument("--measure", type=int, default=32, help="tokens of the micro-batch measured on the CPU")
p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # a child's part: SHAPE LAYERS CHECKPOINTING
args = p.parse_args()
run_script(lambda: check_writable(args.out, args.overwrite))

import torch  # noqa: E402

from bench.shapes import SHAPES, random_llama  # noqa: E402
from headmap.adapters import attach_headmap  # noqa: E402
from headmap.train import checkpointed_layers, summed_nll  # noqa: E402

ALL = {**SHAPES, "llama3-70b": dict(layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=128256)}
GiB = 2 ** 30


def saved_bytes(shape: dict, layers: int, tokens: int, checkpointing: bool = False) -> int:
    """Bytes autograd keeps for backward in one HeadMap step of `tokens` tokens (one row) on a model of `shape` cut
    to `layers` decoder layers, HeadMap on 8 heads (or a quarter) of every layer; weights zero (the count needs
    none)."""
    with torch.device("meta"):
        model = random_llama(shape, torch.bfloat16, "meta", layers=layers)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.zero_()
    n = max(1, min(8, shape["heads"] // 4))
    adapter = attach_headmap(model, {layer: list(range(n)) for layer in range(layers)}, rank=32)
    seen, weights = {}, {p.data_ptr() for p in model.parameters()}

    def keep(t):
        if t.data_ptr() not in weights:  # a frozen weight the backward reads is counted with the weights
            seen[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()  # saved twice, held once
        return t
    ids = torch.zeros(1, tokens, dtype=torch.long)
    with checkpointed_layers(model, checkpointing), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        summed_nll(model, ids, None, ids)
    adapter.remove()
    return sum(seen.values())


def measured(name: str, layers: int, checkpointing: bool) -> int:
    """saved_bytes in a process of its own: at 70B width, the memory a freed model leaves in the heap would add up
    over the four measurements past 24 GiB."""
    import subprocess
    done = subprocess.run([sys.executable, __file__, "--out", args.out, "--overwrite", "--measure", str(args.measure),
                           "--one", name, str(layers), str(int(checkpointing))], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.strip().splitlines()[-1])


def row(name: str, shape: dict) -> dict:
    with torch.device("meta"):
        meta = random_llama(shape, torch.bfloat16, "meta")
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    layer = sum(p.numel() * p.element_size() for p in meta.model.layers[0].parameters())
    root = weights - layer * shape["layers"]
    one, two = measured(name, 1, False), measured(name, 2, False)
    per_layer, rest = two - one, 2 * one - two
    activations = {t: (per_layer * shape["layers"] + rest) * t / args.measure for t in args.tokens}
    one_ck, two_ck = measured(name, 1, True), measured(name, 2, True)
    kept_ck = (two_ck - one_ck) * shape["layers"] + 2 * one_ck - two_ck  # a checkpointed layer keeps its input
    checkpointed = {t: (kept_ck + per_layer) * t / args.measure for t in args.tokens}  # + one layer recomputed
    n = max(1, min(8, shape["heads"] // 4))
    head_dim = shape["hidden"] // shape["heads"]
    adapter_params = shape["layers"] * (n * head_dim * 32 + 32 + 32 * shape["hidden"] + shape["hidden"])
    adapter = adapter_params * 4 * 4  # fp32 weights, gradients, two AdamW moments
    per_rank = {t: {world: (weights / world + 2 * layer + root + activations[t] + adapter) / GiB
                    for world in (1, 2, 8, 16)} for t in args.tokens}
    per_rank_ck = {t: {world: (weights / world + 2 * layer + root + checkpointed[t] + adapter) / GiB
                       for world in (1, 2, 8, 16)} for t in args.tokens}
    print(f"{name}: {per_layer / args.measure / 2 ** 10:.1f} KiB a token a layer kept for backward, "
          f"{rest / args.measure / 2 ** 10:.1f} KiB a token for the embeddings, head and loss; checkpointed "
          f"{kept_ck / shape['layers'] / args.measure / 2 ** 10:.1f} KiB a token a layer", flush=True)
    return {"shape": name, "weights_gib": weights / GiB, "layer_gib": layer / GiB, "root_gib": root / GiB,
            "activations_gib": {t: a / GiB for t, a in activations.items()},
            "checkpointed_activations_gib": {t: a / GiB for t, a in checkpointed.items()},
            "checkpointed_per_rank_gib": per_rank_ck,
            "adapter_and_optimizer_gib": adapter / GiB,
            "per_rank_gib": per_rank}


def main():
    rows = [row(name, ALL[name]) for name in ("llama2-7b", "llama3-8b", "llama3-70b")]
    for t in args.tokens:
        print(f"\nGiB per rank, micro-batches of {t} tokens")
        print(f"{'shape':<12}{'weights':>9}{'activations':>13}" + "".join(f"{f'{w} ranks':>10}" for w in (1, 2, 8, 16)))
        for r in rows:
            print(f"{r['shape']:<12}{r['weights_gib']:>9.1f}{r['activations_gib'][t]:>13.1f}"
                  + "".join(f"{r['per_rank_gib'][t][w]:>10.1f}" for w in (1, 2, 8, 16)))
        print("with --activation-checkpointing")
        for r in rows:
            print(f"{r['shape']:<12}{r['weights_gib']:>9.1f}{r['checkpointed_activations_gib'][t]:>13.1f}"
                  + "".join(f"{r['checkpointed_per_rank_gib'][t][w]:>10.1f}" for w in (1, 2, 8, 16)))
    write_json(args.out, {"measured_tokens": args.measure, "rows": rows})


if args.one:
    print(saved_bytes(ALL[args.one[0]], int(args.one[1]), args.measure, bool(int(args.one[2]))))
else:
    run_script(main)
