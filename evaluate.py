"""Zero-shot accuracy of a causal LM on the commonsense datasets, your own rows, or an lm-evaluation-harness task.

    python evaluate.py --dataset arc_easy --limit 200
    python evaluate.py --dataset all --prompt harness --out results.json
    python evaluate.py --dataset examples/facts/recall           # your own rows (README: Your own task)
    python evaluate.py --dataset lm-eval:sciq                    # any multiple-choice task of lm-evaluation-harness
    torchrun --nproc_per_node 8 evaluate.py --dataset all        # prompt batches split over 8 GPUs
    python evaluate.py --dataset boolq --device-map auto         # a model larger than one GPU
    python evaluate.py --dataset arc_easy --mask experiments/circuits/arc_easy.json  # its heads masked
    python finetune.py --method lora --dataset boolq --out runs/lora
    python evaluate.py --dataset boolq --adapter runs/lora       # base model and prompt style from the adapter

Multiple-choice tasks report acc and acc_norm (lm-evaluation-harness's); one-target tasks report exact_match (the
target is the greedy continuation) and nll_per_token. With --adapter or --mask, the base model and the prompt style
default to what the adapter's training.json (or the circuit's heads.json) recorded; a --model that contradicts them
is refused unless --force, and so is scoring an adapter on the very rows it was trained on.
"""
import argparse
import os
import sys
from contextlib import nullcontext

from cli.arguments import (HelpFormatter, add_model_arguments, add_out_arguments, add_task_arguments, check_at_least,
                           user_path)
from cli.exits import UsageError, refused, run_script
from cli.loading import DEFAULT_MODEL
from cli.outputs import claim_out
from cli.run_folder import TRAINING
from cli.torchrun import check_processes
from cli.trackers import add_report_arguments, check_report_to
from data.commonsense import DATASETS
from headmap.files import ADAPTER_CONFIG


def build_parser() -> argparse.ArgumentParser:
    """The script's options (parse_args checks the values)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_task_arguments(p, f"one of {', '.join(DATASETS)}, a comma list of them, or 'all'", "the eight datasets' "
                       "prompt style (default: the adapter's or circuit's, else paper)")
    p.add_argument("--split", help="default: the task's evaluation split (test where it has one, else validation)")
    p.add_argument("--limit", type=int, help="score only the first N rows (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    add_model_arguments(p, None, f"hub id, local folder or .gguf file (default: the adapter's or circuit's base "
                        f"model, else {DEFAULT_MODEL})", fsdp=True)
    add_report_arguments(p)
    p.add_argument("--mask", type=user_path, help="heads.json (or the official .pt circuit file): score with those "
                   "heads ablated")
    p.add_argument("--random-mask", action="store_true",
                   help="ablate as many heads per layer as --mask names, chosen at random (the paper's control)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-mask")
    p.add_argument("--adapter", type=user_path, help="a folder written by finetune.py (or a PEFT LoRA/DoRA "
                   "folder): score the base "
                   "model with that adapter")
    p.add_argument("--force", action="store_true", help="use --model even where the adapter or circuit recorded "
                   "another base model; score an adapter on the rows it was trained on")
    add_out_arguments(p, "write the results as JSON here")
    p.add_argument("--log-samples", action="store_true", help="store every example's scores in --out")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked: a wrong value is one line here, before anything is read or written."""
    args = build_parser().parse_args(argv)
    if not args.dataset:
        raise UsageError("pass --dataset: one of the eight, all, a file or folder of your own rows, or lm-eval:TASK")
    check_at_least(args, 1, "limit", "batch_size")
    check_processes(args)
    check_report_to(args.report_to)
    if args.random_mask and not args.mask:
        raise UsageError("--random-mask needs --mask heads.json to know how many heads to ablate per layer")
    if args.adapter and not os.path.isfile(os.path.join(args.adapter, ADAPTER_CONFIG)):
        raise UsageError(f"{args.adapter} has no adapter_config.json; pass a folder written by finetune.py or PEFT")
    return args


def same_rows(a: dict, b: dict) -> bool:
    """Whether two provenance records ({dataset, split, data}) name the same rows: a file by its content."""
    if "sha256" in a["data"] and "sha256" in b["data"]:
        return a["data"]["sha256"] == b["data"]["sha256"]
    return a == b


def check_task_records(run, records: dict, here: dict) -> None:
    """An adapter scored on the rows it was trained on gives no held-out number: refused unless --force. An adapter
    or circuit made on another task, or on another version of this file, is a choice (transfer), warned of.
    `records` is what recorded() read of the adapter and circuit files, `here` the rows to score ({dataset, split,
    data})."""
    name, split = here["dataset"], here["split"]
    adapter_record = run.adapter and os.path.join(run.adapter, TRAINING)
    for path, dataset in records["dataset"].items():
        what = "adapter" if path == adapter_record else "circuit"
        made = {"dataset": dataset, "split": records["split"][path] or "train", "data": records["data"][path] or {}}
        if what == "adapter" and same_rows(made, here) and not run.force:
            raise UsageError(f"{run.adapter} was trained on these rows ({name}, {split}), so its score here is not "
                             "a held-out number (training.json's accuracy_after is); score another split, or pass "
                             "--force")
        if dataset not in (None, name):
            print(f"warning: the {what} {path} was made on {dataset}, not {name}", file=sys.stderr)
        elif "sha256" in made["data"] and made["data"]["path"] == here["data"].get("path") \
                and made["data"]["sha256"] != here["data"].get("sha256"):
            print(f"warning: {here['data']['path']} has changed since the {what} {path} was made from it",
                  file=sys.stderr)


def read_tasks(args: argparse.Namespace):
    """The settings (--model from what the adapter or circuit recorded, where left out) and every task's rows,
    loaded before the model: a missing file or a bad row fails in a second, not after minutes. Returns (settings,
    {name: task}, {name: (split, source, rows)}, circuit or None)."""
    from cli.arguments import settled
    from cli.earlier_runs import check_adapter_weights, open_task_for, read_circuit_file, recorded, settle
    names = list(DATASETS) if args.dataset == "all" else args.dataset.split(",")
    records = recorded(args.adapter, args.mask)
    if args.adapter:
        check_adapter_weights(args.adapter)
    run = settled(args, model=settle("model", args.model, records["model"], DEFAULT_MODEL, args.force))
    tasks = {name: open_task_for(name, run, records["prompt"]) for name in names}
    examples = {}
    for name, task in tasks.items():
        split = task.check_split(run.split)
        source = task.source(split)
        check_task_records(run, records, {"dataset": task.name, "split": split, "data": source})
        examples[name] = (split, source, task.examples(split, run.limit))
    return run, tasks, examples, read_circuit_file(run.mask) if run.mask else None


def prepare_model(run, circuit: dict | None):
    """The model as scored: loaded, its adapter attached, and the head mask of --mask (random heads like it with
    --random-mask). Returns (model, tokenizer, mask or None, the mask's record or None)."""
    from cli.earlier_runs import circuit_on
    from cli.loading import load_model, pick_device
    from cli.torchrun import start_distributed
    from headmap.saving import load_adapter
    from headmap.circuit import circuit_mask
    from headmap.masking import layers_and_heads
    start_distributed(pick_device(run.device), run.fsdp)
    model, tokenizer = load_model(run.model, run.device, run.dtype, run.device_map, run.trust_remote_code,
                                  not run.no_progress, run.fsdp)
    if run.adapter:
        with refused(f"cannot load adapter {run.adapter} onto {run.model}", "pass its base model with --model"):
            load_adapter(model, run.adapter)
    if circuit is None:
        return model, tokenizer, None, None
    circuit = circuit_on(model, circuit, run.mask, run.model, run.random_mask, run.seed)
    layers, heads = layers_and_heads(model)
    return model, tokenizer, circuit_mask(circuit, layers, heads), {
        "file": run.mask, "random": run.random_mask, "seed": run.seed,
        "heads": {str(layer): chosen for layer, chosen in circuit.items()}}


def score_task(model, tokenizer, name: str, task, split: str, source: dict, rows: list, mask, run) -> dict:
    """One task's metrics, their standard errors, its rows (and with --log-samples every row's scores)."""
    from data.common import CHOICE
    from data.scoring import context_limit, metrics, reported, score_continuations
    from headmap.masking import mask_heads
    with mask_heads(model, mask) if mask is not None else nullcontext():
        scores = score_continuations(model, tokenizer, rows, run.batch_size, progress=not run.no_progress, desc=name)
    m = metrics(task.kind, rows, scores)
    entry = {"kind": task.kind, "prompt": task.prompt, **reported(task.kind, m),
             "n": m["n"], "split": split, "data": source,
             # rows longer than the model's positions, their context cut from the left (lm-eval's rule)
             "context_cut": {"rows": sum(map(bool, scores.cut)), "most_tokens": max(scores.cut, default=0),
                             "limit": context_limit(model)}}
    if run.log_samples:
        entry["samples"] = [{"index": i, "scores": s, "gold": ex.gold, "correct": c, "greedy": g}
                            for i, (s, ex, c, g) in enumerate(zip(scores.logprob, rows, m["correct"], scores.greedy))]
        if task.kind == CHOICE:
            for sample, pred in zip(entry["samples"], m["predictions"]):
                sample["pred"] = pred
    return entry


def print_table(results: dict, run) -> None:
    """What was scored, and a line per task: its metric with its standard error, and the other metric."""
    from data.common import CHOICE
    from data.scoring import PRIMARY
    applied = []
    if run.adapter:
        applied.append(f"adapter {run.adapter}")
    if results["mask"] is not None:
        applied.append(f"{'random heads like' if run.random_mask else 'heads of'} {run.mask} masked")
    print(f"\n{run.model}, {'; '.join(applied) or 'no adapter, no mask'}")
    print(f"{'dataset':<24}{'split':<12}{'n':>6}  {'metric':<12}{'value':>7}{'± stderr':>10}  other metric")
    for name, r in results["results"].items():
        primary = PRIMARY[r["kind"]]
        other = (f"acc_norm {r['acc_norm']:.3f} ± {r['acc_norm_stderr']:.3f}" if r["kind"] == CHOICE
                 else f"nll/token {r['nll_per_token']:.3f}")
        shown = name if len(name) <= 23 else "..." + name[-20:]
        print(f"{shown:<24}{r['split']:<12}{r['n']:>6}  {primary:<12}{r[primary]:>7.3f}{r[primary + '_stderr']:>10.3f}"
              f"  {other}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    claim_out("file", args.out, args.overwrite, args)
    run, tasks, examples, circuit = read_tasks(args)
    from cli.json_records import software_versions, write_json
    from cli.torchrun import shard_sizes
    from cli.trackers import start_reporting
    from headmap import distributed
    model, tokenizer, mask, mask_record = prepare_model(run, circuit)
    param = next(model.parameters())
    prompts = {task.prompt for task in tasks.values()} - {None}
    results = {
        "model": run.model,
        "prompt": prompts.pop() if len(prompts) == 1 else None,
        "adapter": run.adapter,
        "mask": mask_record,
        "split": run.split,
        "limit": run.limit,
        "dtype": str(param.dtype).replace("torch.", ""),
        "device": str(param.device),
        "device_map": run.device_map,
        "trust_remote_code": run.trust_remote_code,
        "data_dir": run.data_dir,
        "versions": software_versions(),
        "sharding": shard_sizes(model),  # --fsdp: the bytes of the weights, in all and on each rank
        "results": {name: score_task(model, tokenizer, name, task, *examples[name], mask, run)
                    for name, task in tasks.items()},  # per task: its metrics, their standard errors, its rows
    }
    print_table(results, run)
    if run.out and distributed.rank() == 0:  # under torchrun every rank holds every score; rank 0 writes them
        write_json(run.out, results)
        print(f"wrote {run.out}")
    reporter = start_reporting(run, "evaluate", {k: v for k, v in results.items() if k != "results"})
    for name, r in results["results"].items():  # each task's metrics with their standard errors, as printed
        reporter.log({f"{name}/{k}": v for k, v in r.items() if k in ("acc", "acc_norm", "exact_match", "n",
                                                                       "nll_per_token") or k.endswith("_stderr")}, 0)
    reporter.close()
    return results


if __name__ == "__main__":
    run_script(main)
