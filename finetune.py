"""Fine-tune the HeadMap adapter on a located circuit, or a LoRA/DoRA baseline on the same loop.

    python finetune.py --heads experiments/circuits/arc_easy.json          # HeadMap (MHA) on the circuit's dataset
    python finetune.py --heads experiments/circuits/arc_easy.json --variant hs --out runs/hs
    python finetune.py --method lora --dataset boolq --out runs/lora       # baselines need no circuit
    python locate.py --dataset examples/facts/recall --out runs/facts/heads.json   # your own rows (README)
    python finetune.py --heads runs/facts/heads.json --out runs/facts/headmap
    torchrun --nproc_per_node 8 finetune.py --method lora --dataset piqa --out runs/piqa  # batch of 16 over 8 GPUs

Per docs/PROTOCOL.md, with headmap/train.py's loop: text = prompt + gold answer + EOS cut at 512 tokens, loss over
every token, batch 16, 2 epochs, AdamW, 100 warm-up steps then linear decay, clipping at 1.0, bf16 autocast on GPU,
lr 1e-3 (HeadMap) or 2e-4 (LoRA, DoRA); the best adapter by validation loss (every --eval-every steps) is kept.
"""
import argparse
import sys

from cli import run_folder
from cli.arguments import (HelpFormatter, add_model_arguments, add_task_arguments, check_at_least, check_positive,
                           settled, user_path)
from cli.exits import UsageError, refused, run_script
from cli.loading import DEFAULT_MODEL
from cli.outputs import claim_out
from cli.torchrun import check_processes
from cli.trackers import add_report_arguments, check_report_to

HYPER_PARAMETERS = ("lr", "batch_size", "token_budget", "epochs", "warmup", "max_steps", "max_length", "train_limit",
                    "eval_every", "val_limit", "val_fraction", "seed")
METHOD_SETTINGS = {"headmap": ("variant", "random_heads", "rank", "scaling"), "lora": ("rank", "alpha", "dropout"),
                   "dora": ("rank", "alpha", "dropout")}  # the options each method reads


def build_parser() -> argparse.ArgumentParser:
    """The script's options (parse_args checks the values)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--heads", type=user_path, help="heads.json from locate.py (or the official .pt file); needed for "
                   "HeadMap")
    p.add_argument("--method", default="headmap", choices=("headmap", "lora", "dora"),
                   help="the paper's HeadMap on a circuit, or a LoRA/DoRA baseline")
    p.add_argument("--variant", default="mha", choices=("mha", "hs"), help="HeadMap: add the map to the attention "
                   "output (mha) or to the layer's output hidden state (hs)")
    p.add_argument("--random-heads", action="store_true", help="HeadMap on random heads, as many per layer as --heads")
    add_task_arguments(p, "default: the dataset of --heads", "the eight datasets' prompt style (default: the one of "
                       "--heads, else paper)")
    add_model_arguments(p, None, "hub id, local folder or .gguf file (default: the model of --heads, else "
                        f"{DEFAULT_MODEL})", device_map=False, fsdp=True)  # one device per process
    add_report_arguments(p)
    p.add_argument("--force", action="store_true", help="use --model even where --heads recorded another model")
    p.add_argument("--rank", type=int, default=32, help="r of HeadMap, LoRA and DoRA")
    p.add_argument("--scaling", type=float, default=1.0, help="HeadMap scaling factor")
    p.add_argument("--alpha", type=float, default=64, help="LoRA/DoRA alpha")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA/DoRA dropout")
    p.add_argument("--lr", type=float, help="default: 1e-3 for HeadMap, 2e-4 for LoRA and DoRA")
    p.add_argument("--batch-size", type=int, default=16, help="rows per optimizer step")
    p.add_argument("--token-budget", type=int, default=4096, help="most padded tokens (rows x longest row) in one "
                   "forward pass: bounds memory; a batch runs as length-sorted micro-batches within it")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training rows")
    p.add_argument("--warmup", type=int, help="linear warm-up steps, then linear decay to 0 (default: the paper's "
                   "100, or a tenth of a run of 100 steps or fewer)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (default: all epochs)")
    p.add_argument("--max-length", type=int, default=512, help="cut training texts at this many tokens")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, help="recompute each decoder "
                   "layer in backward instead of keeping its activations: the same losses and adapter in far less "
                   "memory, for one more forward a step (docs/scaling.md's table; default: on with --fsdp, else off)")
    p.add_argument("--loss-chunks", type=int, help="compute the LM head and the loss over this many slices of "
                   "each micro-batch's positions, so its whole logits (tokens x vocabulary) never exist at once: the "
                   "same losses and adapter in less memory (default: 8 with --fsdp, else 1: whole)")
    p.add_argument("--offload-activations", action="store_true", help="keep what backward needs (with "
                   "checkpointing: each layer's input) in host memory, not on the GPU: the same losses and adapter "
                   "in less GPU memory, for a copy each way a step (docs/scaling.md's table)")
    p.add_argument("--train-limit", type=int, help="train on the first N rows only (default: all)")
    p.add_argument("--eval-every", type=int, default=200, help="measure the validation loss every N steps")
    p.add_argument("--checkpoint-every", type=int, default=20, help="save what --resume needs every N steps")
    p.add_argument("--val-limit", type=int, help="cap the held-out validation set at N rows (default: all)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="where the task has no validation split of its "
                   "own to spare: the share of the training rows held out (at most 2000 rows, drawn with --seed)")
    p.add_argument("--eval-limit", type=int, help="rows of the evaluation split for the accuracy (default: all)")
    p.add_argument("--seed", type=int, default=0, help="data order, held-out rows, initialisation, dropout")
    p.add_argument("--out", default="runs/adapter", type=user_path, help="folder for adapter, record, log and "
                   "checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint "
                   "(resume/checkpoint.pt)")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one (its files "
                   "are replaced; other files are kept)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked: a wrong value is one line here, before anything is read or written."""
    args = build_parser().parse_args(argv)
    check_at_least(args, 1, "batch_size", "token_budget", "rank", "epochs", "eval_every", "checkpoint_every",
                   "max_length", "max_steps", "loss_chunks", "train_limit", "val_limit", "eval_limit")
    check_at_least(args, 0, "warmup")
    check_positive(args, "lr", "alpha", "scaling")
    check_processes(args)
    check_report_to(args.report_to)  # a tracker that is not installed: one line now, not after the model loads
    if not 0.0 <= args.dropout < 1.0:  # also refuses nan
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.method == "headmap" and not args.heads:
        raise UsageError("HeadMap needs --heads heads.json (run locate.py first), or pass --method lora|dora")
    if not 0.0 < args.val_fraction < 1.0:  # also refuses nan
        raise UsageError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    return args


def settle_run(args: argparse.Namespace):
    """The run's settings, fixed once: --model, --dataset and --prompt from the circuit file where the user left them
    out (another model is refused, another dataset or prompt style warned of), the method's learning rate, the
    warm-up for the run's length. Returns (settings, circuit, task, rows)."""
    from cli.earlier_runs import open_task_for, read_circuit_file, recorded, settle
    from data.common import finetune_rows
    circuit = read_circuit_file(args.heads) if args.heads else None
    records = recorded(circuit=args.heads)
    model = settle("model", args.model, records["model"], DEFAULT_MODEL, args.force)
    dataset = settle("dataset", args.dataset, records["dataset"], None, strict=False)
    if not dataset:
        raise UsageError("pass --dataset (the circuit file does not name one)")
    task = open_task_for(dataset, args, records["prompt"])
    lr = args.lr or (1e-3 if args.method == "headmap" else 2e-4)
    rows = finetune_rows(task, args.train_limit, args.val_fraction, args.val_limit, args.eval_limit, args.seed)
    steps = run_folder.total_steps(len(rows.train), args.batch_size, args.epochs, args.max_steps)
    warmup = args.warmup
    if warmup is None:  # the paper's 100, unless the run is no longer than that (a quick start, a smoke test)
        warmup = 100 if steps > 100 else steps // 10
        if steps <= 100:
            print(f"note: --warmup {warmup} (a tenth of the run's {steps} steps: the paper's 100 would be the whole "
                  "run)", file=sys.stderr)
    elif warmup >= steps:
        print(f"warning: --warmup {warmup} is not shorter than the run's {steps} steps, so the learning rate peaks at "
              f"{lr * steps / max(1, warmup):.2e}, not --lr {lr:.2e}; pass a smaller --warmup", file=sys.stderr)
    run = settled(args, model=model, dataset=dataset, prompt=task.prompt, lr=lr, warmup=warmup,
                  activation_checkpointing=args.fsdp if args.activation_checkpointing is None  # where memory binds
                  else args.activation_checkpointing,
                  loss_chunks=args.loss_chunks or (8 if args.fsdp else 1))
    return run, circuit, task, rows


def recorded_settings(run, circuit: dict | None) -> dict:
    """What decides the result (not the checkpoint interval, progress bars or device): --resume must find the same."""
    settings = {k: getattr(run, k) for k in ("method", *METHOD_SETTINGS[run.method], "dataset", "prompt", "model",
                                             *HYPER_PARAMETERS, "eval_limit")}
    if run.method == "headmap":
        settings["circuit"] = {str(k): v for k, v in sorted(circuit.items())}
    return settings


def attach(model, circuit: dict | None, run):
    """The run's adapter on the frozen model: HeadMap on the circuit (or random heads like it), or LoRA/DoRA."""
    import torch

    from cli.earlier_runs import circuit_on
    from cli.loading import hub_id_of
    from headmap.adapters import attach_headmap, attach_lora
    torch.manual_seed(run.seed)  # adapter initialisation and dropout
    if run.method == "headmap":
        circuit = circuit_on(model, circuit, run.heads, run.model, run.random_heads, run.seed)
        adapter = attach_headmap(model, circuit, run.rank, run.scaling, run.variant)
    else:
        with refused(f"cannot attach {run.method}"):
            adapter = attach_lora(model, run.rank, run.alpha, run.dropout, dora=run.method == "dora")
        print(f"{run.method} targets: {', '.join(adapter.config['target_modules'])}")
    adapter.config["base_model_name_or_path"] = hub_id_of(run.model)  # what PEFT's AutoPeftModel loads
    return adapter


def train_and_score(model, tokenizer, adapter, task, rows, run, ckpt: dict | None, config: dict, base: dict):
    """Train in the run folder, reporting to the trackers (the same tracker runs on --resume), then score the
    trained adapter. Returns (best {"loss", "step"}, steps, accuracy after)."""
    from cli.json_records import write_json
    from cli.trackers import start_reporting
    from data.scoring import pad_id_of, task_metric
    from data.training import training_texts
    from headmap import distributed
    reporter = start_reporting(run, "finetune", config, run_folder.read_tracker_ids(run.out) if run.resume else None)
    if reporter.ids and distributed.rank() == 0:  # a --resume continues these tracker runs
        write_json(run_folder.resume_file(run.out, run_folder.TRACKER_IDS), reporter.ids)
    try:
        adapter.train()
        train_seqs, val_seqs = (training_texts(tokenizer, r, run.max_length) for r in (rows.train, rows.val))
        best, steps = run_folder.train_in_folder(model, adapter, train_seqs, val_seqs, pad_id_of(tokenizer), run,
                                                 ckpt=ckpt, reporter=reporter, base=base)
        adapter.eval()
        after = task_metric(model, tokenizer, task.kind, rows.eval, run.batch_size, not run.no_progress,
                            "accuracy after")
        reporter.log({"accuracy_after": after, "trainable_parameters": config["trainable_parameters"]}, steps)
    finally:
        reporter.close()
    return best, steps, after


def main(argv=None):
    args = parse_args(argv)
    claim_out("run", args.out, args.overwrite, args, resume=args.resume)
    run, circuit, task, rows = settle_run(args)
    settings = recorded_settings(run, circuit)
    from cli.json_records import software_versions
    from cli.loading import base_weights, load_model, pick_device
    from cli.torchrun import shard_sizes, start_distributed
    from data.scoring import PRIMARY
    from headmap import distributed
    start_distributed(pick_device(run.device), run.fsdp)
    if run.offload_activations and pick_device(run.device).type == "cpu":
        print("note: --offload-activations on the CPU copies within host memory: it saves nothing here",
              file=sys.stderr)
    recorded_run, ckpt = run_folder.read_run_state(run.out, run.resume, settings)
    model, tokenizer = load_model(run.model, run.device, run.dtype, trust_remote_code=run.trust_remote_code,
                                  progress=not run.no_progress, fsdp=run.fsdp)
    adapter = attach(model.requires_grad_(False), circuit, run)
    trainable, base = sum(p.numel() for p in adapter.parameters()), sum(p.numel() for p in model.parameters())
    print(f"{run.method}: {trainable:,} trainable parameters of {base + trainable:,} "
          f"({100 * trainable / (base + trainable):.4f}%)")
    adapter.eval()  # modules start in training mode: no dropout while scoring
    before, val_loss_before = run_folder.base_numbers(model, tokenizer, task, rows, run, recorded_run, settings)
    best, steps, after = train_and_score(model, tokenizer, adapter, task, rows, run, ckpt,
                                         {**settings, "trainable_parameters": trainable},
                                         {"val_loss": val_loss_before, "accuracy_before": before})
    record = {
        "method": adapter.method,
        "adapter": adapter.config,
        "base_model": run.model,
        "base_weights": base_weights(run.model),  # a GGUF file: which one, de-quantised (None: the model as named)
        "trust_remote_code": run.trust_remote_code,
        "dataset": task.name,
        "prompt": task.prompt,
        "random_heads": run.random_heads,
        "circuit_file": run.heads,
        "kind": task.kind,
        "split": task.train_split,
        "data": rows.source,  # where the rows came from (a file: its path, row count and sha256)
        "held_out": rows.held_out,
        "eval_split": rows.eval_split,
        "val_loss_before": val_loss_before,
        "best_val_loss": best["loss"],
        "best_step": best["step"],
        "steps": steps,
        "trainable_parameters": trainable,
        "hyper_parameters": {k: getattr(run, k) for k in HYPER_PARAMETERS},
        "processes": distributed.world(),
        "activation_checkpointing": run.activation_checkpointing,
        "loss_chunks": run.loss_chunks,
        "offload_activations": run.offload_activations,
        "sharding": shard_sizes(model),  # --fsdp: the bytes of the frozen weights, in all and on each rank
        "metric": PRIMARY[task.kind],
        "accuracy_before": before,
        "accuracy_after": after,
        "eval_rows": len(rows.eval),
        "versions": software_versions(),
    }
    if distributed.rank() == 0:
        run_folder.write_run_files(run.out, adapter, record, title=f"{adapter.method} on {run.dataset}")
    print(f"{PRIMARY[task.kind]} on {len(rows.eval)} rows of {rows.eval_split}: {before:.3f} -> {after:.3f} "
          f"(best validation loss {best['loss']:.4f} at step {best['step']}); adapter in {run.out}")
    return record


if __name__ == "__main__":
    run_script(main, resumable=True)
