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
import math
import os
import sys
import time

from cli import (HelpFormatter, UsageError, add_model_arguments, add_task_arguments, check_at_least, check_fsdp,
                 check_positive, run_script, user_path)
from models import DEFAULT_MODEL
from runs import check_run_folder, hold_output, input_paths
from trackers import add_report_arguments, check_report_to


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


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_at_least(args, 1, "batch_size", "token_budget", "rank", "epochs", "eval_every", "checkpoint_every",
                   "max_length", "max_steps", "train_limit", "val_limit", "eval_limit")
    check_at_least(args, 0, "warmup")
    check_positive(args, "lr", "alpha", "scaling")
    check_fsdp(args)
    check_report_to(args.report_to)  # a tracker that is not installed: one line now, not after the model loads
    if args.activation_checkpointing is None:  # where memory binds: a sharded model
        args.activation_checkpointing = args.fsdp
    if not 0.0 <= args.dropout < 1.0:  # also refuses nan
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    hold_output(args.out)  # a live run in --out is named before anything else is said of the folder
    check_run_folder(args.out, args.resume, args.overwrite, input_paths(args))
    if args.method == "headmap" and not args.heads:
        raise UsageError("HeadMap needs --heads heads.json (run locate.py first), or pass --method lora|dora")
    if not 0.0 < args.val_fraction < 1.0:  # also refuses nan
        raise UsageError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    return args


if __name__ == "__main__":
    run_script(parse_args)  # --help and bad arguments answer at once, before torch and transformers load

import torch  # noqa: E402

from cli import refused  # noqa: E402
from models import base_weights, hub_id_of, load_model, pick_device, start_distributed  # noqa: E402
from records import open_task_for, read_circuit_file, read_interrupted_run, recorded, settle  # noqa: E402
from runs import (BEFORE, CHECKPOINT, TRACKER_IDS, open_log, read_checkpoint, read_tracker_ids,  # noqa: E402
                  resume_file, software_versions, write_json)
from cards import write_model_card  # noqa: E402
from sharding import shard_sizes  # noqa: E402
from data.scoring import PRIMARY, epoch_batches, lm_batch, pad_id_of, task_metric, training_texts  # noqa: E402
from data.common import held_out_rows  # noqa: E402
from headmap import distributed  # noqa: E402
from headmap.adapters import attach_headmap, attach_lora, save_adapter  # noqa: E402
from headmap.circuit import check_circuit, random_circuit_like  # noqa: E402
from headmap.files import atomic  # noqa: E402
from headmap.masking import layers_and_heads  # noqa: E402
from headmap.train import batch_loss, train_adapter  # noqa: E402
from plot import curves  # noqa: E402
from trackers import NoReporter, start_reporting  # noqa: E402


HYPER_PARAMETERS = ("lr", "batch_size", "token_budget", "epochs", "warmup", "max_steps", "max_length", "train_limit",
                    "eval_every", "val_limit", "val_fraction", "seed")


METHOD_SETTINGS = {"headmap": ("variant", "random_heads", "rank", "scaling"), "lora": ("rank", "alpha", "dropout"),
                   "dora": ("rank", "alpha", "dropout")}  # the options each method reads


def total_steps(n_rows, args):
    """Optimizer steps of the run: every epoch's batches, unless --max-steps stops it sooner."""
    return min(args.max_steps or 10 ** 12, math.ceil(n_rows / args.batch_size) * args.epochs)


def train(model, adapter, train_seqs, val_seqs, pad_id, args, on_step=lambda step: None, ckpt=None,
          reporter=None, base: dict | None = None):
    """train_adapter with the run's files: the best adapter written to --out when it improves, a checkpoint every
    --checkpoint-every steps and at each validation, one log line per step, sent to the `reporter`'s trackers too
    (after `base`, the base model's numbers, at step 0). Continues from `ckpt` (read here with --resume when not
    given). Returns (best {"loss", "step"}, steps)."""
    main_rank = distributed.rank() == 0  # under torchrun only rank 0 reads the checkpoint, logs, writes
    os.makedirs(args.out, exist_ok=True)
    if args.resume and ckpt is None and main_rank:
        ckpt = read_checkpoint(args.out)
        if ckpt is None:
            print(f"--resume: no checkpoint in {args.out} yet; starting at step 0")
    ckpt = distributed.from_rank0(ckpt if args.resume else None)
    if ckpt:
        print(f"resuming at step {ckpt['step']}")
    # train_adapter keeps the best adapter and says which it is in each step's checkpoint: the latest one is read
    latest = {"checkpoint": lambda: ckpt or {"best": {"loss": math.inf, "step": 0}}}
    total = total_steps(len(train_seqs), args)
    reporter = reporter or NoReporter()
    log, reporter.sent = open_log(args.out, ckpt["step"] if ckpt else 0, main_rank)  # steps sent: not again
    reporter.log(base or {}, 0)
    start_time = time.time() - (ckpt["seconds"] if ckpt else 0.0)  # the log's seconds run on across resumes

    def after_step(entry, checkpoint):
        latest["checkpoint"] = checkpoint
        entry["seconds"] = round(time.time() - start_time, 3)
        if entry.pop("best", False) and main_rank:
            save_adapter(adapter, args.out)
        log.write(entry)  # before the checkpoint: a resume cuts the log back to the checkpoint's step, never short
        reporter.log(entry, entry["step"])
        if main_rank and ("val_loss" in entry or entry["step"] % args.checkpoint_every == 0):
            with atomic(resume_file(args.out, CHECKPOINT)) as tmp:
                torch.save({**checkpoint(), "seconds": entry["seconds"]}, tmp)
        on_step(entry["step"])

    try:
        train_adapter(model, adapter, epoch_batches(train_seqs, pad_id, args.batch_size, args.epochs, args.seed),
                      total, args.lr, args.warmup, token_budget=args.token_budget, eval_every=args.eval_every,
                      eval_batch=lm_batch(val_seqs, pad_id), resume=ckpt, on_step=after_step, seed=args.seed,
                      progress=not args.no_progress, activation_checkpointing=args.activation_checkpointing)
    except FloatingPointError as err:  # run_script prints it (exit 1): not bad input
        best = latest["checkpoint"]()["best"]
        raise FloatingPointError(f"{err}. The best adapter so far (step {best['step']}) is in {args.out}") from None
    finally:
        log.close()
    best = latest["checkpoint"]()["best"]
    return {"loss": best["loss"], "step": best["step"]}, total


def settle_run(args):
    """--model, --dataset and --prompt from the circuit file where the user left them out (another model is refused,
    another dataset or prompt style warned of); returns the circuit and the task."""
    circuit = read_circuit_file(args.heads) if args.heads else None
    records = recorded(circuit=args.heads)
    args.model = settle("model", args.model, records["model"], DEFAULT_MODEL, args.force)
    args.dataset = settle("dataset", args.dataset, records["dataset"], None, strict=False)
    if not args.dataset:
        raise UsageError("pass --dataset (the circuit file does not name one)")
    task = open_task_for(args.dataset, args, records["prompt"])
    args.prompt = task.prompt
    args.lr = args.lr or (1e-3 if args.method == "headmap" else 2e-4)
    return circuit, task


def attach(model, circuit, args):
    torch.manual_seed(args.seed)  # adapter initialisation and dropout
    if args.method == "headmap":
        layers, heads = layers_and_heads(model)
        with refused(f"{args.heads} does not fit {args.model}"):
            check_circuit(circuit, layers, heads)
        if args.random_heads:
            circuit = random_circuit_like(circuit, heads, torch.Generator().manual_seed(args.seed))
        adapter = attach_headmap(model, circuit, args.rank, args.scaling, args.variant)
    else:
        with refused(f"cannot attach {args.method}"):
            adapter = attach_lora(model, args.rank, args.alpha, args.dropout, dora=args.method == "dora")
        print(f"{args.method} targets: {', '.join(adapter.config['target_modules'])}")
    adapter.config["base_model_name_or_path"] = hub_id_of(args.model)  # what PEFT's AutoPeftModel loads
    return adapter


def main(argv=None):
    args = parse_args(argv)
    circuit, task = settle_run(args)
    examples = task.examples(task.train_split, args.train_limit)
    source = task.source(task.train_split)  # the rows as read now, not as the file may be when training ends
    train_examples, val_examples, held_out = held_out_rows(task, examples, args.val_fraction, args.seed)
    val_examples = val_examples[:args.val_limit]
    print(f"{len(train_examples)} training rows of {task.train_split}; held out: {held_out}")
    if task.eval_split == task.train_split:  # one file (or only a train split): the held-out rows are all it has
        eval_split, eval_examples = "held-out rows", val_examples[:args.eval_limit]
        print(f"{task.name} has no evaluation split of its own: the accuracy is measured on the held-out rows")
    else:
        eval_split, eval_examples = task.eval_split, task.examples(task.eval_split, args.eval_limit)
    steps = total_steps(len(train_examples), args)
    if args.warmup is None:  # the paper's 100, unless the run is no longer than that (a quick start, a smoke test)
        args.warmup = 100 if steps > 100 else steps // 10
        if steps <= 100:
            print(f"note: --warmup {args.warmup} (a tenth of the run's {steps} steps: the paper's 100 would be the whole "
                  "run)", file=sys.stderr)
    elif args.warmup >= steps:
        print(f"warning: --warmup {args.warmup} is not shorter than the run's {steps} steps, so the learning rate "
              f"peaks at {args.lr * steps / max(1, args.warmup):.2e}, not --lr {args.lr:.2e}; pass a smaller --warmup",
              file=sys.stderr)
    # what decides the result (not the checkpoint interval, progress bars or device): --resume must find the same
    settings = {k: getattr(args, k) for k in ("method", *METHOD_SETTINGS[args.method], "dataset", "prompt", "model",
                                              *HYPER_PARAMETERS, "eval_limit")}
    if args.method == "headmap":
        settings["circuit"] = {str(k): v for k, v in sorted(circuit.items())}
    start_distributed(pick_device(args.device), args.fsdp)
    recorded_run, ckpt = read_interrupted_run(args.out, args.resume, settings)

    model, tokenizer = load_model(args.model, args.device, args.dtype, trust_remote_code=args.trust_remote_code,
                                  progress=not args.no_progress, fsdp=args.fsdp)
    model.requires_grad_(False)
    adapter = attach(model, circuit, args)
    trainable, base = sum(p.numel() for p in adapter.parameters()), sum(p.numel() for p in model.parameters())
    print(f"{args.method}: {trainable:,} trainable parameters of {base + trainable:,} "
          f"({100 * trainable / (base + trainable):.4f}%)")

    pad_id = pad_id_of(tokenizer)
    val_seqs = training_texts(tokenizer, val_examples, args.max_length)
    adapter.eval()  # modules start in training mode: no dropout while scoring
    if recorded_run is not None:  # the base model's numbers (the adapter starts as the identity), measured once
        before, val_loss_before = recorded_run["accuracy"], recorded_run["val_loss"]
    else:
        before = task_metric(model, tokenizer, task.kind, eval_examples, args.batch_size, not args.no_progress,
                             "accuracy before")
        val_loss_before = batch_loss(model, lm_batch(val_seqs, pad_id), args.token_budget)
        if distributed.rank() == 0:
            write_json(resume_file(args.out, BEFORE),
                       {"accuracy": before, "val_loss": val_loss_before, "settings": settings})
    reporter = start_reporting(args, "finetune", {**settings, "trainable_parameters": trainable},
                               read_tracker_ids(args.out) if args.resume else None)
    if reporter.ids and distributed.rank() == 0:  # a --resume continues these tracker runs
        write_json(resume_file(args.out, TRACKER_IDS), reporter.ids)
    try:
        adapter.train()
        best, steps = train(model, adapter, training_texts(tokenizer, train_examples, args.max_length), val_seqs,
                            pad_id, args, ckpt=ckpt, reporter=reporter,
                            base={"val_loss": val_loss_before, "accuracy_before": before})
        adapter.eval()
        after = task_metric(model, tokenizer, task.kind, eval_examples, args.batch_size, not args.no_progress,
                            "accuracy after")
        reporter.log({"accuracy_after": after, "trainable_parameters": trainable}, steps)  # before: at step 0
    finally:
        reporter.close()

    record = {
        "method": adapter.method,
        "adapter": adapter.config,
        "base_model": args.model,
        "base_weights": base_weights(args.model),  # a GGUF file: which one, de-quantised (None: the model as named)
        "trust_remote_code": args.trust_remote_code,
        "dataset": task.name,
        "prompt": task.prompt,
        "random_heads": args.random_heads,
        "circuit_file": args.heads,
        "kind": task.kind,
        "split": task.train_split,
        "data": source,  # where the rows came from (a file: its path, row count and sha256)
        "held_out": held_out,
        "eval_split": eval_split,
        "val_loss_before": val_loss_before,
        "best_val_loss": best["loss"],
        "best_step": best["step"],
        "steps": steps,
        "trainable_parameters": trainable,
        "hyper_parameters": {k: getattr(args, k) for k in HYPER_PARAMETERS},
        "processes": distributed.world(),
        "activation_checkpointing": args.activation_checkpointing,
        "sharding": shard_sizes(model),  # --fsdp: the bytes of the frozen weights, in all and on each rank
        "metric": PRIMARY[task.kind],
        "accuracy_before": before,
        "accuracy_after": after,
        "eval_rows": len(eval_examples),
        "versions": software_versions(),
    }
    if distributed.rank() == 0:
        save_adapter(adapter, args.out)
        write_json(os.path.join(args.out, "training.json"), record)
        write_model_card(args.out, record)  # README.md: the folder is ready for the Hub
        curves([args.out], os.path.join(args.out, "curves.svg"), title=f"{adapter.method} on {args.dataset}")
    print(f"{PRIMARY[task.kind]} on {len(eval_examples)} rows of {eval_split}: {before:.3f} -> {after:.3f} "
          f"(best validation loss {best['loss']:.4f} at step {best['step']}); adapter in {args.out}")
    return record


if __name__ == "__main__":
    run_script(main, resumable=True)
