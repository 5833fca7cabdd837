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
- with --activation-checkpointing: what the same hooks count with the layers checkpointed (each layer's input,
  which the checkpoint saves, and what stays outside the layers: the final norm, the logits and the loss) and, at
  the peak, one layer's activations while it is recomputed in backward;
- with --fsdp's defaults (checkpointing, the loss in --loss-chunks slices, the embeddings and the LM head gathered
  apart): the hooks' count with the loss in slices (each slice's logits are made again in backward), and at the
  peak the larger of one layer recomputed and one slice's loss computed and back-propagated, the latter measured
  as the rise of a process's peak resident memory over a slice of the real width and vocabulary; gathered, the
  larger of two layers and a layer with the embeddings or the LM head;
- with --offload-activations on top: the device keeps none of what the hooks count (it waits in host memory), but
  a layer's kept input comes back while that layer is recomputed.
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
p.add_argument("--loss-chunks", type=int, default=8, help="slices of the loss (finetune's --loss-chunks)")
p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # a child's part: SHAPE LAYERS CHECKPOINTING CHUNKS
p.add_argument("--slice", nargs=2, help=argparse.SUPPRESS)  # a child's part: SHAPE TOKENS
args = p.parse_args()
run_script(lambda: check_writable(args.out, args.overwrite))

import torch  # noqa: E402

from bench.shapes import SHAPES, random_llama  # noqa: E402
from headmap.adapters import attach_headmap  # noqa: E402
from headmap.train import checkpointed_layers, summed_nll  # noqa: E402

ALL = {**SHAPES, "llama3-70b": dict(layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=128256)}
GiB = 2 ** 30


def saved_bytes(shape: dict, layers: int, tokens: int, checkpointing: bool = False, loss_chunks: int = 1) -> int:
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
        summed_nll(model, ids, None, ids, loss_chunks)
    adapter.remove()
    return sum(seen.values())


def slice_peak(shape: dict, tokens: int) -> int:
    """The rise of this process's peak resident memory while one slice of `tokens` positions goes through the LM
    head (bf16, the real width and vocabulary) and the loss, forward and backward: what the chunked loss holds at
    once besides what the layers keep."""
    import resource
    import torch.nn.functional as F
    with torch.device("meta"):
        head = torch.nn.Linear(shape["hidden"], shape["vocab"], bias=False, dtype=torch.bfloat16)
    head.to_empty(device="cpu").requires_grad_(False).weight.zero_()
    hidden = torch.zeros(tokens, shape["hidden"], dtype=torch.bfloat16, requires_grad=True)
    targets = torch.zeros(tokens, dtype=torch.long)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    F.cross_entropy(head(hidden).float(), targets, reduction="sum").backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # KiB on Linux


def child(*part: str) -> int:
    """One measurement in a process of its own: at 70B width, the memory a freed model leaves in the heap would add
    up over the measurements past 24 GiB, and a process's peak is its own."""
    import subprocess
    done = subprocess.run([sys.executable, __file__, "--out", args.out, "--overwrite", "--measure", str(args.measure),
                           *part], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def measured(name: str, layers: int, checkpointing: bool, loss_chunks: int = 1) -> int:
    return child("--one", name, str(layers), str(int(checkpointing)), str(loss_chunks))


def row(name: str, shape: dict) -> dict:
    with torch.device("meta"):
        meta = random_llama(shape, torch.bfloat16, "meta")
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    layer = sum(p.numel() * p.element_size() for p in meta.model.layers[0].parameters())
    root = weights - layer * shape["layers"]
    embeddings, head = (sum(p.numel() * p.element_size() for p in m.parameters())
                        for m in (meta.get_input_embeddings(), meta.get_output_embeddings()))
    one, two = measured(name, 1, False), measured(name, 2, False)
    per_layer, rest = two - one, 2 * one - two
    activations = {t: (per_layer * shape["layers"] + rest) * t / args.measure for t in args.tokens}
    one_ck, two_ck = measured(name, 1, True), measured(name, 2, True)
    kept_ck = (two_ck - one_ck) * shape["layers"] + 2 * one_ck - two_ck  # a checkpointed layer keeps its input
    checkpointed = {t: (kept_ck + per_layer) * t / args.measure for t in args.tokens}  # + one layer recomputed
    k = args.loss_chunks
    one_ch, two_ch = measured(name, 1, True, k), measured(name, 2, True, k)
    kept_ch = (two_ch - one_ch) * shape["layers"] + 2 * one_ch - two_ch
    slices = {t: child("--slice", name, str(t // k)) for t in args.tokens}  # one slice's loss, at the real size
    chunked = {t: kept_ch * t / args.measure + max(per_layer * t / args.measure, slices[t]) for t in args.tokens}
    # offloaded: what the hooks count waits in host memory; a layer's input comes back while it is recomputed
    offloaded = {t: max((per_layer + two_ch - one_ch) * t / args.measure, slices[t]) for t in args.tokens}
    n = max(1, min(8, shape["heads"] // 4))
    head_dim = shape["hidden"] // shape["heads"]
    adapter_params = shape["layers"] * (n * head_dim * 32 + 32 + 32 * shape["hidden"] + shape["hidden"])
    adapter = adapter_params * 4 * 4  # fp32 weights, gradients, two AdamW moments
    gathered = 2 * layer + root  # the root whole
    apart = max(2 * layer, layer + max(embeddings, head)) + root - embeddings - head  # (untied shapes)

    def per_rank(gathered: float, kept: dict) -> dict:
        return {t: {world: (weights / world + gathered + kept[t] + adapter) / GiB for world in (1, 2, 8, 16)}
                for t in args.tokens}
    print(f"{name}: {per_layer / args.measure / 2 ** 10:.1f} KiB a token a layer kept for backward, "
          f"{rest / args.measure / 2 ** 10:.1f} KiB a token for the embeddings, head and loss; checkpointed "
          f"{kept_ck / shape['layers'] / args.measure / 2 ** 10:.1f} KiB a token a layer, "
          f"{(2 * one_ck - two_ck) / args.measure / 2 ** 10:.1f} outside them, with the loss in {k} slices "
          f"{(2 * one_ch - two_ch) / args.measure / 2 ** 10:.1f}; one slice's loss at its peak "
          + ", ".join(f"{slices[t] / GiB:.2f} GiB ({t // k} tokens)" for t in args.tokens), flush=True)
    return {"shape": name, "weights_gib": weights / GiB, "layer_gib": layer / GiB, "root_gib": root / GiB,
            "embeddings_gib": embeddings / GiB, "head_gib": head / GiB, "loss_chunks": k,
            "activations_gib": {t: a / GiB for t, a in activations.items()},
            "checkpointed_activations_gib": {t: a / GiB for t, a in checkpointed.items()},
            "chunked_activations_gib": {t: a / GiB for t, a in chunked.items()},
            "offloaded_activations_gib": {t: a / GiB for t, a in offloaded.items()},
            "slice_peak_gib": {t: a / GiB for t, a in slices.items()},
            "adapter_and_optimizer_gib": adapter / GiB,
            "per_rank_gib": per_rank(gathered, activations),
            "checkpointed_per_rank_gib": per_rank(gathered, checkpointed),
            "chunked_per_rank_gib": per_rank(apart, chunked),  # --fsdp's defaults
            "offloaded_per_rank_gib": per_rank(apart, offloaded)}


def main():
    rows = [row(name, ALL[name]) for name in ("llama2-7b", "llama3-8b", "llama3-70b")]
    for t in args.tokens:
        print(f"\nGiB per rank, micro-batches of {t} tokens")
        print(f"{'shape':<12}{'weights':>9}{'activations':>13}" + "".join(f"{f'{w} ranks':>10}" for w in (1, 2, 8, 16)))
        for r in rows:
            print(f"{r['shape']:<12}{r['weights_gib']:>9.1f}{r['activations_gib'][t]:>13.1f}"
                  + "".join(f"{r['per_rank_gib'][t][w]:>10.1f}" for w in (1, 2, 8, 16)))
        for title, kind in (("with --activation-checkpointing", "checkpointed"),
                            (f"with --fsdp's defaults (checkpointing, --loss-chunks {args.loss_chunks}, embeddings "
                             "and LM head gathered apart)", "chunked"),
                            ("and --offload-activations", "offloaded")):
            print(title)
            for r in rows:
                print(f"{r['shape']:<12}{r['weights_gib']:>9.1f}{r[f'{kind}_activations_gib'][t]:>13.1f}"
                      + "".join(f"{r[f'{kind}_per_rank_gib'][t][w]:>10.1f}" for w in (1, 2, 8, 16)))
    write_json(args.out, {"measured_tokens": args.measure, "rows": rows})


if args.one:
    print(saved_bytes(ALL[args.one[0]], int(args.one[1]), args.measure, bool(int(args.one[2])), int(args.one[3])))
elif args.slice:
    print(slice_peak(ALL[args.slice[0]], int(args.slice[1])))
else:
    run_script(main)
