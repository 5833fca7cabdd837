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

from data.tasks import DATA_DIR_HELP, DATASETS, PROMPT_STYLES, check_dataset, default_data_dir
from kernels.model import DEFAULT_MODEL, HelpFormatter, UsageError, run_script


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}, a comma list, or 'all'")
    p.add_argument("--split", help="default: validation (test for arc_easy, arc_challenge, openbookqa)")
    p.add_argument("--limit", type=int, help="score only the first N rows (default: all)")
    p.add_argument("--prompt", choices=PROMPT_STYLES, help="prompt style (default: the adapter's or circuit's, "
                   "else paper)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    p.add_argument("--model", help=f"hub id, local folder or .gguf file (default: the adapter's or circuit's base "
                   f"model, else {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--device-map", help="spread the model over several devices (accelerate): auto, balanced, "
                   "sequential, or a JSON map {module name: device}, as a file or a string; overrides --device")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16")
    p.add_argument("--data-dir", default=default_data_dir(), help=DATA_DIR_HELP)
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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in list(DATASETS) if args.dataset == "all" else args.dataset.split(","):
        check_dataset(name)
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.random_mask and not args.mask:
        raise UsageError("--random-mask needs --mask heads.json to know how many heads to ablate per layer")
    if args.adapter and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise UsageError(f"{args.adapter} has no adapter_config.json; pass a folder written by finetune.py or PEFT")
    return args


if __name__ == "__main__":
    run_script(parse_args)  # --help and bad arguments answer at once, before torch and transformers load

import torch  # noqa: E402
import transformers  # noqa: E402

from data import distributed  # noqa: E402
from data.files import check_adapter_weights, check_writable, read_json, settle, write_json  # noqa: E402
from data.scoring import accuracy, score_examples  # noqa: E402
from data.tasks import data_source, load_examples  # noqa: E402
from kernels.adapters import load_adapter  # noqa: E402
from kernels.circuit import check_circuit, circuit_mask, random_circuit_like, read_circuit  # noqa: E402
from kernels.masking import layers_and_heads, mask_heads  # noqa: E402
from kernels.model import load_model, pick_device  # noqa: E402


def recorded_settings(args) -> tuple[dict, dict]:
    """What the adapter and the circuit file recorded: ({file: base model}, {file: prompt style})."""
    models, prompts = {}, {}
    if args.adapter:
        training = os.path.join(args.adapter, "training.json")
        if os.path.exists(training):
            meta = read_json(training, "adapter record")
            models[training], prompts[training] = meta.get("base_model"), meta.get("prompt")
        else:  # a PEFT folder names its base model, not its prompt style
            config = os.path.join(args.adapter, "adapter_config.json")
            models[config] = read_json(config, "adapter config").get("base_model_name_or_path")
    if args.mask and args.mask.endswith(".json"):
        meta = read_json(args.mask, "circuit file")
        models[args.mask], prompts[args.mask] = meta.get("model"), meta.get("prompt")
    return models, prompts


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = list(DATASETS) if args.dataset == "all" else args.dataset.split(",")
    if args.out:
        check_writable(args.out)
    models, prompts = recorded_settings(args)
    if args.adapter:
        check_adapter_weights(args.adapter)
    args.model = settle("model", args.model, models, DEFAULT_MODEL, args.force)
    args.prompt = settle("prompt", args.prompt, prompts, "paper", strict=False)
    # Load every dataset before the model, so a missing file fails in a second, not after minutes.
    examples = {n: load_examples(n, args.split, args.prompt, args.data_dir, args.limit) for n in names}

    circuit = read_circuit(args.mask) if args.mask else None
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
        try:
            load_adapter(model, args.adapter).eval()
        except (OSError, KeyError, RuntimeError, ValueError) as err:
            raise UsageError(f"cannot load adapter from {args.adapter} onto {args.model} ({type(err).__name__}: "
                             f"{str(err).strip().splitlines()[0]}); pass its base model with --model") from None
    mask = None
    if circuit is not None:
        layers, heads = layers_and_heads(model)
        check_circuit(circuit, layers, heads, args.mask)
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
