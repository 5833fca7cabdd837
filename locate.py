"""Locate a task's knowledge circuit: layer-conditioned locating (HeadMap, Algorithm 1; headmap/locate.py).

    python locate.py --dataset boolq --out heads.json
    python locate.py --dataset examples/facts/recall --out runs/facts/heads.json   # your own rows (README)
    torchrun --nproc_per_node 8 locate.py --dataset piqa --out runs/piqa.json     # candidate rows over 8 GPUs

D holds the --samples samples of the split that the unmasked model gets right (its top choice; for a one-target
task, the target reproduced greedily, every token the argmax) with the lowest loss. For each layer in order, with
the heads already chosen below masked, every head is masked in turn and scored by the summed loss of D's gold
answers; the n heads whose masking hurts most join the circuit. Then the circuit is validated: the task's accuracy
with it masked against random heads of the same per-layer counts.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext

from cli import (HelpFormatter, UsageError, add_model_arguments, add_out_arguments, add_task_arguments, check_at_least,
                 check_fsdp, run_script, user_path)
from models import DEFAULT_MODEL
from trackers import add_report_arguments, check_report_to
from data.commonsense import DATASETS


def build_parser() -> argparse.ArgumentParser:
    """The script's options (parse_args checks the values)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_task_arguments(p, ", ".join(DATASETS), "the eight datasets' prompt style (default: paper)")
    add_model_arguments(p, DEFAULT_MODEL, "hub id, local folder or .gguf file", fsdp=True)
    add_report_arguments(p)
    p.add_argument("--split", help="where the samples come from (default: the task's train split; a single file's "
                   "rows)")
    p.add_argument("--pool", type=int, help="draw the samples from the first N rows of the split (default: all)")
    p.add_argument("--samples", type=int, default=64, help="D: the samples each head is scored on")
    p.add_argument("--samples-from", metavar="HEADS_JSON", type=user_path, help="D from an earlier locate run of "
                   "the same model, task, "
                   "split and pool, instead of scoring the pool again: its samples, or with a smaller --samples its "
                   "lowest-loss ones (to vary n or D)")
    p.add_argument("--heads-per-layer", type=int, help="n (default: a quarter of the heads, 8 of 32)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per scoring pass (choosing samples, validation)")
    p.add_argument("--token-budget", type=int, help="most padded tokens in one locating pass (rows x longest row): "
                   "bounds memory (default: 65536 on a GPU, 1024 on a CPU)")
    add_out_arguments(p, "the circuit file; the heat map goes beside it (.svg; plot.py draws PNG/PDF)", "heads.json",
                      overwrite_help="replace an existing --out and its heat map (--resume replaces them too: they "
                      "are the run's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random head sets of the validation")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from <out>.progress.json")
    p.add_argument("--no-validate", action="store_true", help="skip the accuracy check with heads masked")
    p.add_argument("--validate-split", help="default: the task's evaluation split")
    p.add_argument("--validate-limit", type=int, default=500, help="rows of the validation split (0 = all)")
    p.add_argument("--random-trials", type=int, default=5, help="random head sets the circuit is compared with")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if not args.dataset:
        raise UsageError("pass --dataset: one of the eight, a file or folder of your own rows, or lm-eval:TASK")
    check_at_least(args, 1, "samples", "batch_size", "token_budget", "random_trials", "pool", "heads_per_layer")
    check_at_least(args, 0, "validate_limit")
    check_fsdp(args)
    check_report_to(args.report_to)
    return args


if __name__ == "__main__":
    run_script(parse_args)  # --help and bad arguments answer at once, before torch and transformers load

import torch  # noqa: E402

from models import load_model, pick_device, start_distributed  # noqa: E402
from records import check_same_run, open_task_for  # noqa: E402
from runs import (check_inputs_kept, check_writable, hold_output, input_paths, read_json,  # noqa: E402
                  software_versions, write_json)
from sharding import shard_sizes  # noqa: E402
from trackers import start_reporting, tracker_folder  # noqa: E402
from data.scoring import (PRIMARY, answer_samples, baselines, context_limit, metrics,  # noqa: E402
                          score_continuations, task_metric)
from data.common import CHOICE  # noqa: E402
from headmap import distributed  # noqa: E402
from headmap.circuit import circuit_entry, circuit_mask, random_circuit_like  # noqa: E402
from headmap.locate import check_locatable, locate_circuit, unmasked_answer_loss  # noqa: E402
from headmap.masking import UnsupportedModel, layers_and_heads, mask_heads  # noqa: E402
from plot import heat_map, print_heat_map  # noqa: E402


def select_samples(model, tokenizer, task, examples, count, batch_size, progress=True) -> dict[str, list]:
    """The `count` examples the unmasked model answers correctly with the lowest gold loss: their indices and those
    losses (summed over the answer's tokens), in index order."""
    scores = score_continuations(model, tokenizer, examples, batch_size, progress, "choosing samples")
    correct = [i for i, right in enumerate(metrics(task.kind, examples, scores)["correct"]) if right]
    if not correct:
        raise UsageError("the unmasked model answers no example of the pool correctly; try "
                         + ("--prompt harness, " if task.prompt == "paper" else "") + "another --split or a larger --pool")
    if len(correct) < count:
        print(f"warning: only {len(correct)} correct samples (asked for {count}); using them all", file=sys.stderr)
    return lowest_loss(correct, [-scores.logprob[i][examples[i].gold] for i in correct], count)


def lowest_loss(indices: list[int], losses: list[float], count: int) -> dict[str, list]:
    """The `count` of `indices` (in index order) with the lowest losses, ties to the lower index."""
    kept = sorted(sorted(range(len(indices)), key=lambda k: losses[k])[:count])
    return {"sample_indices": [indices[k] for k in kept], "sample_losses": [losses[k] for k in kept]}


def samples_from(path: str, settings: dict, source: dict, count: int) -> dict[str, list]:
    """The samples an earlier run chose (see select_samples), if it drew them from the same rows for the same model:
    all of them, or the `count` of lowest loss (the same as scoring the pool again would choose)."""
    earlier = read_json(path, "--samples-from", "pass a heads.json written by locate.py")
    if not isinstance(earlier, dict) or not isinstance(earlier.get("sample_indices"), list):
        raise UsageError(f"--samples-from {path} records no samples; pass a heads.json written by locate.py")
    same = {**{k: settings[k] for k in ("model", "dataset", "split", "pool", "prompt")}, "data": source}
    for key, value in json.loads(json.dumps(same)).items():  # as the file holds them
        if earlier.get(key) != value:
            raise UsageError(f"--samples-from {path}: its samples were chosen with {key} {earlier.get(key)!r}, not "
                             f"{value!r}; pass a run of the same model, task, split and pool")
    held = len(earlier["sample_indices"])
    if count > held:
        raise UsageError(f"--samples-from {path} holds {held} samples; pass --samples {held} or fewer")
    if count == held:
        return {"sample_indices": earlier["sample_indices"], "sample_losses": earlier.get("sample_losses")}
    if "sample_losses" not in earlier:  # runs before 2026-11-28 recorded none
        raise UsageError(f"--samples-from {path} records no sample losses, so its {count} lowest-loss samples are "
                         f"unknown; pass --samples {held}, or drop --samples-from")
    return lowest_loss(earlier["sample_indices"], earlier["sample_losses"], count)


def validate(model, tokenizer, task, examples, circuit, trials, seed, batch_size, progress=True):
    """The task's metric (acc, or exact_match for one target) with no mask, with the circuit masked, and with random
    heads of the same per-layer counts."""
    layers, heads = layers_and_heads(model)

    def score(circ, desc):
        with mask_heads(model, circuit_mask(circ, layers, heads)) if circ is not None else nullcontext():
            return task_metric(model, tokenizer, task.kind, examples, batch_size, progress, desc)

    g = torch.Generator().manual_seed(seed)
    random_scores = [score(random_circuit_like(circuit, heads, g), f"random heads masked, {k + 1} of {trials}")
                     for k in range(trials)]
    return {"rows": len(examples), "metric": PRIMARY[task.kind], "unmasked": score(None, "unmasked"),
            "circuit_masked": score(circuit, "circuit masked"), "random_masked_mean": statistics.mean(random_scores),
            "random_masked_std": statistics.stdev(random_scores) if trials > 1 else 0.0, "random_masked": random_scores,
            **baselines(task.kind, examples)}


def knows_the_task(v: dict) -> bool:
    """Whether the unmasked accuracy is clearly (two standard errors) above both chance and the majority class:
    only then is a circuit whose masking lowers it a circuit of task knowledge."""
    floor = max(v["chance"], v["majority"])
    return v["unmasked"] > floor + 2 * math.sqrt(floor * (1 - floor) / v["rows"])


# ---------------------------------------------------------------- main

def main(argv=None):
    begun = time.time()
    args = parse_args(argv)
    task = open_task_for(args.dataset, args)
    split = task.check_split(args.split or task.train_split)
    val_split = task.check_split(args.validate_split)
    svg = os.path.splitext(args.out)[0] + ".svg"
    hold_output(args.out)  # and so its heat map and progress file: a second run on them is refused
    check_writable(args.out, args.overwrite or args.resume)  # --resume: this run's own files, as finetune's
    check_writable(svg, args.overwrite or args.resume, "the heat map of --out")
    progress_path = args.out + ".progress.json"
    check_writable(progress_path, True, "the progress file of --out")
    if args.overwrite or args.resume:
        check_inputs_kept({"--out": args.out, "the heat map of --out": svg}, input_paths(args))
    examples = task.examples(split, args.pool)
    if args.samples > len(examples):
        more = f" or a --pool above {args.pool}" if args.pool == len(examples) else ""
        raise UsageError(f"--samples {args.samples} asks for more samples than the pool holds ({len(examples)} rows of "
                         f"{task.name} {split}); pass --samples {len(examples)} or fewer{more}")
    val_examples = None if args.no_validate else task.examples(val_split, args.validate_limit or None)
    # The rows as read now, not as the file may be when the search ends; one file is hashed once.
    source = task.source(split)
    val_source = source if val_split == split or val_examples is None else task.source(val_split)
    if val_examples is not None and split == val_split:
        print(f"note: the samples and the validation both come from {split} of {task.name}: the validation includes "
              "the samples", file=sys.stderr)
    # what decides the result; batch sizes, budgets, progress bars and devices do not (beyond float rounding)
    settings = {"model": args.model, "dataset": task.name, "split": split, "pool": args.pool,
                "prompt": task.prompt, "samples": args.samples, "samples_from": args.samples_from,
                "validate": not args.no_validate, "validate_split": args.validate_split,
                "validate_limit": args.validate_limit, "random_trials": args.random_trials, "seed": args.seed}
    earlier = samples_from(args.samples_from, settings, source, args.samples) if args.samples_from else None
    start_distributed(pick_device(args.device), args.fsdp)
    saved = None  # the interrupted run, read and checked before the model loads
    if args.resume and distributed.rank() == 0 and os.path.exists(progress_path):
        saved = read_json(progress_path, "progress file", "delete it to start over")
        if not isinstance(saved, dict) or not {"settings", "circuit", "loss_matrix", "circuit_below_loss"} <= set(saved):
            raise UsageError(f"progress file {progress_path} is not one locate.py wrote; delete it to start over")
    saved = distributed.from_rank0(saved)  # under torchrun, only rank 0 reads and writes files
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.device_map, args.trust_remote_code,
                                  not args.no_progress, args.fsdp)
    layers, heads = layers_and_heads(model)
    n = args.heads_per_layer if args.heads_per_layer is not None else max(1, round(heads / 4))
    if not 1 <= n < heads:  # the library refuses it too, but only after the pool is scored
        raise UsageError(f"--heads-per-layer must be in 1..{heads - 1} for a model with {heads} heads, got {n}")
    try:
        check_locatable(model)
    except UnsupportedModel as err:
        raise UsageError(f"cannot locate heads in {args.model}: {err}") from None

    settings["heads_per_layer"] = n
    state = {"settings": settings, "circuit": {}, "loss_matrix": [], "circuit_below_loss": [], "seconds": 0.0}
    if saved is not None:
        check_same_run(progress_path, saved["settings"], settings)
        state = saved
        done = len(state["loss_matrix"])
        print(f"resuming after layer {done - 1}" if done else "resuming with the samples chosen before")
    else:
        if args.resume:
            print(f"--resume: no {progress_path} yet; starting from the first layer")
        state.update(earlier or select_samples(model, tokenizer, task, examples, args.samples, args.batch_size,
                                               not args.no_progress))
        if distributed.rank() == 0:  # choosing them scores the whole pool: minutes on a CPU, not to be redone
            write_json(progress_path, state)
    samples = answer_samples(tokenizer, [examples[i] for i in state["sample_indices"]], context_limit(model))

    started = time.time() - state["seconds"]
    # the trackers: one step a layer; a resumed search continues their runs and sends no layer twice
    reporter = start_reporting(args, "locate", settings, state.get("trackers"), sent=len(state["loss_matrix"]) or -1)
    state["trackers"] = reporter.ids

    def save_progress(state):
        state["seconds"] = time.time() - started
        if distributed.rank() == 0:
            write_json(progress_path, state)
        layer, row = len(state["loss_matrix"]) - 1, state["loss_matrix"][-1]
        chosen = [row[h] for h in state["circuit"][str(layer)]] if str(layer) in state["circuit"] else []
        reporter.log({"chosen_heads_loss": sum(chosen) / max(1, len(chosen)), "all_heads_loss": sum(row) / len(row),
                      "circuit_below_loss": state["circuit_below_loss"][-1]}, layer + 1)

    circuit, _ = locate_circuit(model, samples, heads_per_layer=n, token_budget=args.token_budget,
                                on_layer=save_progress, state=state, progress=not args.no_progress)
    seconds = time.time() - started
    result = {
        **circuit_entry(circuit),  # the official format: {"knowledge_circuit": {layer: {"retain_heads": [...]}}}
        **settings,
        "layers": layers,
        "heads": heads,
        "sample_indices": state["sample_indices"],
        "sample_losses": state.get("sample_losses"),
        "loss_matrix": state["loss_matrix"],  # (layers, heads): summed answer loss, head masked on the circuit below
        "circuit_below_loss": state["circuit_below_loss"],  # per layer: the circuit below masked, no head of its own
        "unmasked_loss": unmasked_answer_loss(model, samples),
        "kind": task.kind,
        "data": source,
        "trust_remote_code": args.trust_remote_code,
        "sharding": shard_sizes(model),  # --fsdp: the bytes of the weights, in all and on each rank
        "seconds": round(seconds, 1),
        "versions": software_versions(),
    }
    print_heat_map(state["loss_matrix"], circuit)
    if val_examples is not None:
        validating = time.time()
        v = validate(model, tokenizer, task, val_examples, circuit, args.random_trials, args.seed, args.batch_size,
                     not args.no_progress)
        result["validation"] = {"split": val_split, "data": val_source, **v}
        result["validation_seconds"] = round(time.time() - validating, 1)
        commonest = "majority class" if task.kind == CHOICE else "commonest target"
        print(f"\n{v['metric']} on {v['rows']} rows of {val_split}: unmasked {v['unmasked']:.3f} "
              f"(chance {v['chance']:.3f}, {commonest} {v['majority']:.3f}), circuit masked "
              f"{v['circuit_masked']:.3f}, random heads masked {v['random_masked_mean']:.3f} "
              + (f"+- {v['random_masked_std']:.3f} ({args.random_trials} draws)" if args.random_trials > 1
                 else "(1 draw: no spread to give)"))
        reporter.log({f"validation_{k}": v[k] for k in ("unmasked", "circuit_masked", "random_masked_mean",
                                                        "random_masked_std", "chance")}, layers + 1)
        if not knows_the_task(v):
            print(f"warning: the unmasked model ({v['unmasked']:.3f}) is not clearly above chance ({v['chance']:.3f}) "
                  f"and the {commonest} ({v['majority']:.3f}), so the circuit says little about task knowledge; "
                  + ("try --prompt harness" if task.prompt == "paper" else "try a task the model can do"),
                  file=sys.stderr)
    if distributed.rank() == 0:
        write_json(args.out, result)
        heat_map(result, svg)
        if reporter.ids:  # the heat map as an image in the trackers
            png = os.path.join(tracker_folder(args.out), "heatmap.png")
            heat_map(result, png)
            reporter.image("heatmap", png, layers + 1)
        if os.path.exists(progress_path):
            os.remove(progress_path)
    reporter.close()
    times = f"search {seconds:.1f} s" + (f", validation {result['validation_seconds']:.1f} s"
                                         if val_examples is not None else "")
    print(f"located {sum(map(len, circuit.values()))} heads ({times}; {time.time() - begun:.1f} s in all for this "
          f"command, loading the model and choosing the samples included); wrote {args.out} and {svg}")
    return result


if __name__ == "__main__":
    run_script(main, resumable=True)
