"""Zero-shot multiple-choice accuracy of a causal LM on the commonsense datasets.

    python evaluate.py --dataset arc_easy --limit 200
    python evaluate.py --dataset all --prompt harness --out results.json
    torchrun --nproc_per_node 8 evaluate.py --dataset all        # prompt batches split over 8 GPUs
    python evaluate.py --dataset boolq --device-map auto        # a model larger than one GPU
    python evaluate.py --dataset boolq --adapter runs/adapter     # base model and prompt style from the adapter

With --adapter or --mask, the base model and the prompt style default to what the adapter's training.json (or
the circuit's heads.json) recorded; a --model that contradicts them is refused unless --force.
"""
import argparse
import math
import os
import sys
from contextlib import nullcontext

from cli import DEFAULT_MODEL, HelpFormatter, UsageError, add_model_arguments, check_at_least, run_script
from data.tasks import DATASETS, PROMPT_STYLES, check_dataset


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}, a comma list, or 'all'")
    p.add_argument("--split", help="default: validation (test for arc_easy, arc_challenge, openbookqa)")
    p.add_argument("--limit", type=int, help="score only the first N rows (default: all)")
    p.add_argument("--prompt", choices=PROMPT_STYLES, help="prompt style (default: the adapter's or circuit's, "
                   "else paper)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    add_model_arguments(p, None, f"hub id, local folder or .gguf file (default: the adapter's or circuit's base "
                        f"model, else {DEFAULT_MODEL})")
    p.add_argument("--mask", help="heads.json (or the official .pt circuit file): score with those heads ablated")
    p.add_argument("--random-mask", action="store_true",
                   help="ablate as many heads per layer as --mask names, chosen at random (the paper's control)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-mask")
    p.add_argument("--adapter", help="a folder written by finetune.py (or a PEFT LoRA/DoRA folder): score the base "
                   "model with that adapter")
    p.add_argument("--force", action="store_true", help="use --model even where the adapter or circuit recorded "
                   "another base model")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--log-samples", action="store_true", help="store every example's scores in --out")
    args = p.parse_args(argv)
    for name in list(DATASETS) if args.dataset == "all" else args.dataset.split(","):
        check_dataset(name)
    check_at_least(args, 1, "limit", "batch_size")
    if args.random_mask and not args.mask:
        raise UsageError("--random-mask needs --mask heads.json to know how many heads to ablate per layer")
    if args.adapter and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise UsageError(f"{args.adapter} has no adapter_config.json; pass a folder written by finetune.py or PEFT")
    return args


if __name__ == "__main__":
    run_script(parse_args)  # --help and bad arguments answer at once, before torch and transformers load

import torch  # noqa: E402
import transformers  # noqa: E402

from cli import (check_adapter_weights, check_writable, load_model, pick_device, read_circuit_file, recorded,  # noqa: E402
                 refused, settle, write_json)
from data import distributed  # noqa: E402
from data.scoring import accuracy, score_examples  # noqa: E402
from data.tasks import data_source, load_examples  # noqa: E402
from headmap.adapters import load_adapter  # noqa: E402
from headmap.circuit import check_circuit, circuit_mask, random_circuit_like  # noqa: E402
from headmap.masking import layers_and_heads, mask_heads  # noqa: E402


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = list(DATASETS) if args.dataset == "all" else args.dataset.split(",")
    if args.out:
        check_writable(args.out)
    records = recorded(args.adapter, args.mask)
    if args.adapter:
        check_adapter_weights(args.adapter)
    args.model = settle("model", args.model, records["model"], DEFAULT_MODEL, args.force)
    args.prompt = settle("prompt", args.prompt, records["prompt"], "paper", strict=False)
    # Load every dataset before the model, so a missing file fails in a second, not after minutes.
    examples = {n: load_examples(n, args.split, args.prompt, args.data_dir, args.limit) for n in names}

    circuit = read_circuit_file(args.mask) if args.mask else None
    distributed.start(pick_device(args.device))
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.device_map)
    param = next(model.parameters())
    results = {"model": args.model, "prompt": args.prompt, "adapter": args.adapter, "mask": None,
               "split": args.split, "limit": args.limit, "dtype": str(param.dtype).replace("torch.", ""),
               "device": str(param.device), "device_map": args.device_map, "data_dir": args.data_dir,
               "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                            "transformers": transformers.__version__},
               "results": {}}
    if args.adapter:
        with refused(f"cannot load adapter {args.adapter} onto {args.model}", "pass its base model with --model"):
            load_adapter(model, args.adapter).eval()
    mask = None
    if circuit is not None:
        layers, heads = layers_and_heads(model)
        with refused(f"{args.mask} does not fit {args.model}"):
            check_circuit(circuit, layers, heads)
        if args.random_mask:
            circuit = random_circuit_like(circuit, heads, torch.Generator().manual_seed(args.seed))
        mask = circuit_mask(circuit, layers, heads)
        results["mask"] = {"file": args.mask, "random": args.random_mask, "seed": args.seed,
                           "heads": {str(layer): chosen for layer, chosen in circuit.items()}}
    for name in names:
        with mask_heads(model, mask) if mask is not None else nullcontext():
            scores = score_examples(model, tokenizer, examples[name], args.batch_size,
                                    progress=not args.no_progress, desc=name)
        metrics = accuracy(examples[name], scores)
        split = args.split or DATASETS[name].eval_split
        n = metrics["n"]
        entry = {"acc": metrics["acc"], "acc_stderr": math.sqrt(metrics["acc"] * (1 - metrics["acc"]) / max(1, n - 1)),
                 "acc_norm": metrics["acc_norm"], "n": n, "split": split,
                 "data": data_source(name, split, args.data_dir)}
        if args.log_samples:
            entry["samples"] = [{"index": i, "scores": s, "gold": ex.gold, "pred": p}
                                for i, (s, ex, p) in enumerate(zip(scores, examples[name], metrics["predictions"]))]
        results["results"][name] = entry

    applied = []
    if args.adapter:
        applied.append(f"adapter {args.adapter}")
    if mask is not None:
        applied.append(f"{'random heads like' if args.random_mask else 'heads of'} {args.mask} masked")
    print(f"\n{args.model}, {args.prompt} prompts, {'; '.join(applied) or 'no adapter, no mask'}")
    print(f"{'dataset':<15}{'split':<12}{'n':>6}{'acc':>8}{'± stderr':>10}{'acc_norm':>10}")
    for name, r in results["results"].items():
        print(f"{name:<15}{r['split']:<12}{r['n']:>6}{r['acc']:>8.3f}{r['acc_stderr']:>10.3f}{r['acc_norm']:>10.3f}")
    if args.out and distributed.rank() == 0:  # under torchrun every rank holds every score; rank 0 writes them
        write_json(args.out, results)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    run_script(main)
