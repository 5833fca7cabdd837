"""Zero-shot multiple-choice accuracy of a causal LM on the commonsense datasets.

    python evaluate.py --dataset arc_easy --limit 200
    python evaluate.py --dataset all --prompt harness --out results.json
"""
import argparse
import time
from contextlib import nullcontext

import torch

from data import (DATA_DIR_HELP, DATASETS, PROMPT_STYLES, accuracy, check_dataset, data_source, default_data_dir,
                  load_examples, score_examples)
from data.files import check_writable, write_json
from kernels.adapters import load_adapter
from kernels.circuit import check_circuit, circuit_mask, random_circuit_like, read_circuit
from kernels.masking import mask_heads
from kernels.model import DEFAULT_MODEL, UsageError, load_model, run_script


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}, a comma list, or 'all'")
    p.add_argument("--split", help="default: validation (test for arc_easy, arc_challenge, openbookqa)")
    p.add_argument("--limit", type=int, help="score only the first N rows")
    p.add_argument("--prompt", default="paper", choices=PROMPT_STYLES)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder or .gguf file")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--data-dir", default=default_data_dir(), help=DATA_DIR_HELP)
    p.add_argument("--mask", help="heads.json (or the official .pt circuit file): score with those heads ablated")
    p.add_argument("--random-mask", action="store_true",
                   help="ablate as many heads per layer as --mask names, chosen at random (the paper's control)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-mask")
    p.add_argument("--adapter", help="a folder written by finetune.py: score the base model with that adapter")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--log-samples", action="store_true", help="store every example's scores in --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.random_mask and not args.mask:
        raise UsageError("--random-mask needs --mask heads.json to know how many heads to ablate per layer")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = list(DATASETS) if args.dataset == "all" else args.dataset.split(",")
    for name in names:
        check_dataset(name)
    if args.out:
        check_writable(args.out)
    # Load every dataset before the model, so a missing file fails in a second, not after minutes.
    examples = {n: load_examples(n, args.split, args.prompt, args.data_dir, args.limit) for n in names}
    circuit = read_circuit(args.mask) if args.mask else None
    model, tokenizer = load_model(args.model, args.device, args.dtype)

    results = {"model": args.model, "prompt": args.prompt, "results": {}}
    if args.adapter:
        try:
            load_adapter(model, args.adapter).eval()
        except (OSError, KeyError, RuntimeError, ValueError) as err:
            raise UsageError(f"cannot load adapter from {args.adapter} ({type(err).__name__}: "
                             f"{str(err).splitlines()[0]}); pass a folder written by finetune.py") from None
        results["adapter"] = args.adapter
    mask = None
    if circuit is not None:
        layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
        check_circuit(circuit, layers, heads, args.mask)
        if args.random_mask:
            circuit = random_circuit_like(circuit, heads, torch.Generator().manual_seed(args.seed))
        mask = circuit_mask(circuit, layers, heads)
        results["masked_heads"] = {str(layer): chosen for layer, chosen in circuit.items()}
        results["mask"] = {"file": args.mask, "random": args.random_mask, "seed": args.seed}
    for name in names:
        start = time.time()
        with mask_heads(model, mask) if mask is not None else nullcontext():
            scores = score_examples(model, tokenizer, examples[name], args.batch_size,
                                    progress=not args.no_progress, desc=name)
        metrics = accuracy(examples[name], scores)
        split = args.split or DATASETS[name].eval_split
        entry = {"acc": metrics["acc"], "acc_norm": metrics["acc_norm"], "n": metrics["n"], "split": split,
                 "prompt": args.prompt, "model": args.model, "data": data_source(name, split, args.data_dir),
                 "seconds": round(time.time() - start, 2)}
        if args.log_samples:
            entry["samples"] = [{"index": i, "scores": s, "gold": ex.gold, "pred": p}
                                for i, (s, ex, p) in enumerate(zip(scores, examples[name], metrics["predictions"]))]
        results["results"][name] = entry

    print(f"\n{'dataset':<15}{'split':<12}{'n':>6}{'acc':>8}{'acc_norm':>10}{'sec':>8}   ({args.prompt} prompts)")
    for name, r in results["results"].items():
        print(f"{name:<15}{r['split']:<12}{r['n']:>6}{r['acc']:>8.3f}{r['acc_norm']:>10.3f}{r['seconds']:>8.1f}")
    if args.out:
        write_json(args.out, results)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    run_script(main)
