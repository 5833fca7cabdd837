"""Locate a task's knowledge circuit: layer-conditioned locating (HeadMap, Algorithm 1; headmap/locate.py).

    python locate.py --dataset boolq --out heads.json
    python locate.py --dataset examples/facts/recall --out runs/facts/heads.json   # your own rows (README)
    torchrun --nproc_per_node 8 locate.py --dataset piqa --out runs/piqa.json     # candidate rows over 8 GPUs
    python locate.py --dataset boolq --selector attribution --compare-exact --samples-from heads.json \
        --out runs/boolq_attribution.json      # another selector on the same D, its estimate against the exact effect

D holds the --samples samples of the split that the unmasked model gets right (its top choice; for a one-target
task, the target reproduced greedily, every token the argmax) with the lowest loss. For each layer in order, with
the heads already chosen below masked, every head is masked in turn and scored by the summed loss of D's gold
answers; the n heads whose masking hurts most join the circuit. Then the circuit is validated: the task's accuracy
with it masked against random heads of the same per-layer counts. --selector chooses heads another way instead (each
head masked alone, attribution patching, ITI's probes, LoFiT's scaling, random), n per layer, validated the same.
"""
import argparse
import time

from cli.arguments import (HelpFormatter, add_model_arguments, add_out_arguments, add_task_arguments, check_at_least,
                           user_path)
from cli.exits import UsageError, run_script
from cli.loading import DEFAULT_MODEL
from cli.outputs import claim_out
from cli.run_folder import heat_map_file, progress_file, read_progress, write_circuit_files
from cli.torchrun import check_processes
from cli.selection import (SEARCHES, add_selector_arguments, check_selector_arguments, check_selector_task,
                           compare_exact, selector_scores, selector_settings)
from cli.trackers import add_report_arguments, check_report_to
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
    add_selector_arguments(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked: a wrong value is one line here, before anything is read or written."""
    args = build_parser().parse_args(argv)
    if not args.dataset:
        raise UsageError("pass --dataset: one of the eight, a file or folder of your own rows, or lm-eval:TASK")
    check_at_least(args, 1, "samples", "batch_size", "token_budget", "random_trials", "pool", "heads_per_layer")
    check_at_least(args, 0, "validate_limit")
    check_processes(args)
    check_report_to(args.report_to)
    check_selector_arguments(args)
    return args


def read_rows(args: argparse.Namespace):
    """The task and its rows (data.common.locate_rows), read before the model loads, --out claimed once the task is
    known; and the settings that decide the result (batch sizes, budgets, progress bars and devices do not, beyond
    float rounding). Returns (task, rows, settings)."""
    from cli.earlier_runs import open_task_for
    from data.common import locate_rows
    task = open_task_for(args.dataset, args)
    split = task.check_split(args.split or task.train_split)
    val_split = task.check_split(args.validate_split)
    check_selector_task(args, task)
    claim_out("circuit", args.out, args.overwrite, args, resume=args.resume)
    rows = locate_rows(task, split, args.pool, args.samples, val_split, args.validate_limit or None,
                       not args.no_validate)
    settings = {"model": args.model, "dataset": task.name, "split": split, "pool": args.pool,
                "prompt": task.prompt, "samples": args.samples, "samples_from": args.samples_from,
                "validate": not args.no_validate, "validate_split": args.validate_split,
                "validate_limit": args.validate_limit, "random_trials": args.random_trials, "seed": args.seed,
                **selector_settings(args)}
    return task, rows, settings


def heads_per_layer(model, args: argparse.Namespace) -> int:
    """n: --heads-per-layer, else a quarter of the heads; checked, with the model, before the pool is scored."""
    from headmap.locate import check_locatable
    from headmap.masking import UnsupportedModel, layers_and_heads
    heads = layers_and_heads(model)[1]
    n = args.heads_per_layer if args.heads_per_layer is not None else max(1, round(heads / 4))
    if not 1 <= n < heads:  # the library refuses it too, but only after the pool is scored
        raise UsageError(f"--heads-per-layer must be in 1..{heads - 1} for a model with {heads} heads, got {n}")
    try:
        check_locatable(model)
    except UnsupportedModel as err:
        raise UsageError(f"cannot locate heads in {args.model}: {err}") from None
    return n


def start_search(model, tokenizer, task, examples, args, settings: dict, saved: dict | None, earlier: dict | None):
    """The search's state: the interrupted one (its settings checked), or a new one with its samples chosen (or taken
    from --samples-from) and saved at once: choosing them scores the whole pool, minutes on a CPU."""
    from cli.json_records import write_json
    from cli.run_folder import check_same_run
    from headmap import distributed
    if saved is not None:
        saved["settings"].setdefault("selector", "conditioned")  # a progress file from before there were others
        check_same_run(progress_file(args.out), saved["settings"], settings)
        done = len(saved["loss_matrix"])
        print(f"resuming after layer {done - 1}" if done else "resuming with the samples chosen before")
        return saved
    if args.resume:
        print(f"--resume: no {progress_file(args.out)} yet; starting from the "
              + ("first layer" if args.selector in SEARCHES else "samples"))
    state = {"settings": settings, "circuit": {}, "loss_matrix": [], "circuit_below_loss": [], "seconds": 0.0}
    from data.samples import select_samples
    state.update(earlier or select_samples(model, tokenizer, task, examples, args.samples, args.batch_size,
                                           not args.no_progress))
    if distributed.rank() == 0:
        write_json(progress_file(args.out), state)
    return state


def search(model, tokenizer, samples, pool: list, n: int, state: dict, args, settings: dict):
    """The --selector's score matrix and circuit: a search (locate_circuit) saves its progress after every layer and
    sends it to the trackers (one step a layer; a resumed search continues their runs and sends no layer twice).
    Returns (circuit, scores, selection seconds, reporter)."""
    from cli.json_records import write_json
    from cli.trackers import start_reporting
    from headmap import distributed
    from headmap.locate import locate_circuit
    from headmap.selectors import circuit_from_scores
    started = time.time() - state["seconds"]
    reporter = start_reporting(args, "locate", settings, state.get("trackers"), sent=len(state["loss_matrix"]) or -1)
    state["trackers"] = reporter.ids

    def save_progress(state):
        state["seconds"] = time.time() - started
        if distributed.rank() == 0:
            write_json(progress_file(args.out), state)
        layer, row = len(state["loss_matrix"]) - 1, state["loss_matrix"][-1]
        chosen = [row[h] for h in state["circuit"][str(layer)]] if str(layer) in state["circuit"] else []
        reporter.log({"chosen_heads_loss": sum(chosen) / max(1, len(chosen)), "all_heads_loss": sum(row) / len(row),
                      "circuit_below_loss": state["circuit_below_loss"][-1]}, layer + 1)

    if args.selector in SEARCHES:
        _, scores = locate_circuit(model, samples, heads_per_layer=n, token_budget=args.token_budget,
                                   on_layer=save_progress, state=state, progress=not args.no_progress,
                                   conditioned=args.selector == "conditioned")
    else:
        scores = selector_scores(model, tokenizer, samples, pool, args)
    return circuit_from_scores(scores, n), scores.tolist(), time.time() - started, reporter


def validate_and_say(model, tokenizer, task, rows, circuit, args, result: dict, reporter) -> None:
    """The circuit's validation (validate_circuit) into `result`, printed and sent to the trackers."""
    from data.validation import print_validation, validate_circuit
    validating = time.time()
    v = validate_circuit(model, tokenizer, task, rows.val, circuit, args.random_trials, args.seed, args.batch_size,
                         not args.no_progress)
    result["validation"] = {"split": rows.val_split, "data": rows.val_source, **v}
    result["validation_seconds"] = round(time.time() - validating, 1)
    print_validation(v, task.kind, task.prompt, rows.val_split, args.random_trials)
    reporter.log({f"validation_{k}": v[k] for k in ("unmasked", "circuit_masked", "random_masked_mean",
                                                    "random_masked_std", "chance")}, result["layers"] + 1)


def main(argv=None):
    begun = time.time()
    args = parse_args(argv)
    task, rows, settings = read_rows(args)
    from cli.earlier_runs import samples_from
    earlier = samples_from(args.samples_from, settings, rows.source, args.samples) if args.samples_from else None
    from cli.json_records import software_versions
    from cli.loading import load_model, pick_device
    from cli.torchrun import shard_sizes, start_distributed
    from cli.figures import print_heat_map
    from data.samples import answer_samples
    from data.scoring import context_limit
    from headmap import distributed
    from headmap.circuit import circuit_entry
    from headmap.locate import unmasked_answer_loss
    from headmap.masking import layers_and_heads
    start_distributed(pick_device(args.device), args.fsdp)
    # the interrupted run, read and checked before the model loads; under torchrun only rank 0 reads files
    saved = distributed.from_rank0(read_progress(args.out) if args.resume and distributed.rank() == 0 else None)
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.device_map, args.trust_remote_code,
                                  not args.no_progress, args.fsdp)
    settings["heads_per_layer"] = n = heads_per_layer(model, args)
    state = start_search(model, tokenizer, task, rows.pool, args, settings, saved, earlier)
    samples = answer_samples(tokenizer, [rows.pool[i] for i in state["sample_indices"]], context_limit(model))
    circuit, scores, seconds, reporter = search(model, tokenizer, samples, rows.pool, n, state, args, settings)
    layers, heads = layers_and_heads(model)
    search_only = {  # (layers, heads): summed answer loss, head masked (on the circuit below, when conditioned);
        # per layer: the circuit below masked, no head of its own
        "loss_matrix": state["loss_matrix"], "circuit_below_loss": state["circuit_below_loss"]}
    result = {
        **circuit_entry(circuit),  # the official format: {"knowledge_circuit": {layer: {"retain_heads": [...]}}}
        **settings,
        "layer_conditioned": args.selector == "conditioned",  # each layer chosen with the circuit below masked
        "layers": layers,
        "heads": heads,
        "sample_indices": state["sample_indices"],
        "sample_losses": state.get("sample_losses"),
        **(search_only if args.selector in SEARCHES else {}),
        "score_matrix": scores,  # (layers, heads): the selector's score, higher = more important
        "unmasked_loss": unmasked_answer_loss(model, samples),
        "kind": task.kind,
        "data": rows.source,
        "trust_remote_code": args.trust_remote_code,
        "sharding": shard_sizes(model),  # --fsdp: the bytes of the weights, in all and on each rank
        "seconds": round(seconds, 1),  # the selection's: its score matrix and circuit, once D is chosen
        "versions": software_versions(),
    }
    if args.selector in ("probe", "lofit"):  # they rank heads over the whole model: their own pick, of the same size
        from headmap.selectors import global_circuit
        result["global_circuit"] = {str(layer): h for layer, h in global_circuit(scores, layers * n).items()}
    if args.compare_exact:
        result["exact_comparison"] = compare_exact(model, samples, scores, args)
    print_heat_map(scores, circuit, args.selector)
    if rows.val is not None:
        validate_and_say(model, tokenizer, task, rows, circuit, args, result, reporter)
    write_circuit_files(result, args.out, reporter)
    times = f"search {seconds:.1f} s" + (f", validation {result['validation_seconds']:.1f} s"
                                         if rows.val is not None else "")
    print(f"located {sum(map(len, circuit.values()))} heads ({times}; {time.time() - begun:.1f} s in all for this "
          f"command, loading the model and choosing the samples included); wrote {args.out} and "
          f"{heat_map_file(args.out)}")
    return result


if __name__ == "__main__":
    run_script(main, resumable=True)
