"""Fine-tune the HeadMap adapter on a located circuit, or a LoRA/DoRA baseline on the same loop.

    python finetune.py --heads heads.json                       # HeadMap, MHA variant, the dataset of heads.json
    python finetune.py --heads heads.json --variant hs
    python finetune.py --method lora --dataset boolq            # baselines need no circuit
    python finetune.py --heads runs/capitals/heads.json         # your own rows (README: Your own task)
    torchrun --nproc_per_node 8 finetune.py --heads heads.json  # data parallel: the batch of 16 split over 8 GPUs

Per docs/PROTOCOL.md: train split, text = prompt + delimiter + gold answer (or target) + EOS, loss over every token, cut at 512 tokens,
batch 16, 2 epochs, AdamW without weight decay, linear decay after 100 warm-up steps, gradient clipping at 1.0,
bf16 autocast on GPU; lr 1e-3 (HeadMap) or 2e-4 (LoRA, DoRA). The validation loss is measured every
--eval-every steps and the best adapter is kept. Only the adapter trains; the base model is frozen.
"""
import argparse
import json
import math
import os
import random
import sys
import time

from cli import (DEFAULT_MODEL, HelpFormatter, UsageError, add_model_arguments, add_task_arguments, check_at_least,
                 run_script)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--heads", help="heads.json from locate.py (or the official .pt file); needed for HeadMap")
    p.add_argument("--method", default="headmap", choices=("headmap", "lora", "dora"),
                   help="the paper's HeadMap on a circuit, or a LoRA/DoRA baseline")
    p.add_argument("--variant", default="mha", choices=("mha", "hs"), help="HeadMap: add the map to the attention "
                   "output (mha) or to the layer's output hidden state (hs)")
    p.add_argument("--random-heads", action="store_true", help="HeadMap on random heads, as many per layer as --heads")
    add_task_arguments(p, "default: the dataset of --heads", "the eight datasets' prompt style (default: the one of "
                       "--heads, else paper)")
    add_model_arguments(p, None, "hub id, local folder or .gguf file (default: the model of --heads, else "
                        f"{DEFAULT_MODEL})", device_map=False)  # one device per process; several under torchrun
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
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then linear decay to 0")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (default: all epochs)")
    p.add_argument("--max-length", type=int, default=512, help="cut training texts at this many tokens")
    p.add_argument("--train-limit", type=int, help="train on the first N rows only (default: all)")
    p.add_argument("--eval-every", type=int, default=200, help="measure the validation loss every N steps")
    p.add_argument("--checkpoint-every", type=int, default=20, help="save what --resume needs every N steps")
    p.add_argument("--val-limit", type=int, help="cap the held-out validation set at N rows (default: all)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="where the task has no validation split of its "
                   "own to spare: the share of the training rows held out (at most 2000 rows, drawn with --seed)")
    p.add_argument("--eval-limit", type=int, help="rows of the evaluation split for the final accuracy "
                   "(default: all)")
    p.add_argument("--seed", type=int, default=0, help="data order, held-out rows, initialisation, dropout")
    p.add_argument("--out", default="runs/adapter", help="folder for adapter, record, log and checkpoint")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one (its files "
                   "are replaced; other files are kept)")
    args = p.parse_args(argv)
    check_at_least(args, 1, "batch_size", "token_budget", "rank", "epochs", "eval_every", "checkpoint_every",
                   "max_length", "max_steps", "train_limit", "val_limit", "eval_limit")
    check_at_least(args, 0, "warmup")
    for name in ("lr", "alpha", "scaling"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name} must be a finite number above 0, got {value}")
    if not 0.0 <= args.dropout < 1.0:  # also refuses nan
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite starts a new one; pass one of them")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; pass a folder")
    if os.path.isdir(args.out) and os.listdir(args.out) and not (args.resume or args.overwrite):
        raise UsageError(f"--out {args.out} holds files already (a run?); pass --resume to continue that run, "
                         "--overwrite to start a new one in it, or another --out")
    if args.method == "headmap" and not args.heads:
        raise UsageError("HeadMap needs --heads heads.json (run locate.py first), or pass --method lora|dora")
    if not 0.0 < args.val_fraction < 1.0:  # also refuses nan
        raise UsageError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    return args


if __name__ == "__main__":
    run_script(parse_args)  # --help and bad arguments answer at once, before torch and transformers load

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cli import (check_same_run, hub_id_of, load_model, open_task_for, pick_device, read_checked,  # noqa: E402
                 read_circuit_file, read_json, recorded, refused, settle, write_json)
from data import distributed  # noqa: E402
from data.scoring import (PRIMARY, length_groups, metrics, pad_id_of, pad_right, pass_overhead_tokens,  # noqa: E402
                          score_continuations)
from headmap.adapters import attach_headmap, attach_lora, save_adapter  # noqa: E402
from headmap.circuit import check_circuit, random_circuit_like  # noqa: E402
from headmap.files import atomic  # noqa: E402
from headmap.masking import layers_and_heads  # noqa: E402
from plot import curves  # noqa: E402


def tokenize(tokenizer, examples, max_length):
    eos = tokenizer.eos_token_id
    return [(tokenizer(ex.train_text).input_ids + [eos])[:max_length] for ex in examples]


def split_train_val(task, examples, args) -> tuple[list, list, str]:
    """The protocol's held-out set: the validation split where the task evaluates on another (ARC and OpenBookQA
    evaluate on test), else --val-fraction of train (10%, at most 2000 rows), carved out with the run's seed.
    Returns (train, held out, where the held-out rows came from)."""
    if "validation" in task.splits and task.eval_split not in ("validation", task.train_split):
        return examples, task.examples("validation"), "the validation split"
    order = list(range(len(examples)))
    random.Random(args.seed).shuffle(order)
    n_val = min(2000, max(1, round(len(examples) * args.val_fraction)))
    if n_val >= len(examples):
        raise UsageError(f"{task.name} has {len(examples)} training rows: too few to hold {n_val} out; add rows or "
                         "give it a validation split")
    held = set(order[:n_val])
    return ([e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)],
            f"{n_val} row{'s' * (n_val != 1)} ({args.val_fraction:.0%}) carved out of {task.train_split} with seed {args.seed}")


def lm_loss(model, seqs, pad_id):
    """Sum of next-token NLL over every real token of `seqs` (right-padded into one pass), as a device tensor."""
    device = next(model.parameters()).device
    ids, mask = pad_right(seqs, pad_id, device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        # no padding: no mask, so attention takes its plain causal path (decided on the host: no GPU sync)
        logits = model(input_ids=ids, attention_mask=None if len(set(map(len, seqs))) == 1 else mask).logits
    # position t predicts token t+1; the last position predicts nothing. Labelling it -100 instead of slicing the
    # logits spares the backward pass a zero-filled copy of the whole [rows, length, vocab] logits tensor.
    labels = torch.nn.functional.pad(ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100), (0, 1), value=-100)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


def batch_loss(model, seqs, pad_id, token_budget, backward=False):
    """Token-mean NLL of `seqs`, run as micro-batches without padding work. With backward=True each micro-batch's
    share (its summed NLL / the whole batch's token count) is back-propagated at once, so the gradient is that of
    one padded pass over the batch, to float summation order, in the memory of one micro-batch. The host waits for
    the GPU once, for the returned number.
    Under torchrun each rank runs every world()-th row by length (an even share of the tokens) and the summed NLL
    is all-reduced; each rank's gradient is its rows' share, summed over ranks by all_reduce_grads."""
    # the whole batch's token count: every rank holds every row, so none needs the others' counts sent
    n_tokens = sum(len(s) - 1 for s in seqs)
    mine = distributed.mine(sorted(seqs, key=len, reverse=True))
    total = torch.zeros((), dtype=torch.float64, device=model.device)
    for group in length_groups([len(s) for s in mine], token_budget, pass_overhead_tokens(model.device)):
        nll = lm_loss(model, [mine[i] for i in group], pad_id)
        if backward:
            (nll / n_tokens).backward()
        total += nll.detach()
    return distributed.all_sum(total[None]).item() / n_tokens


def all_reduce_grads(params):
    """Sum the ranks' adapter gradients into every rank's: the gradient of the whole batch's token mean, so every
    rank takes the same optimizer step. An all-reduce of the adapter's gradients rather than
    DistributedDataParallel: the adapter is hooks on a frozen model, not a module DDP wraps, and the ranks run
    different numbers of micro-batch backward passes per step, which DDP's per-backward reduction does not allow.
    One flat tensor: one collective per step."""
    if distributed.world() == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    for p, g in zip(params, distributed.all_sum(flat).split([p.numel() for p in params])):
        p.grad = g.view_as(p)


@torch.no_grad()
def validation_loss(model, seqs, pad_id, token_budget):
    return batch_loss(model, seqs, pad_id, token_budget)


def total_steps(n_rows, args):
    """Optimizer steps of the run: every epoch's batches, unless --max-steps stops it sooner."""
    return min(args.max_steps or 10 ** 12, math.ceil(n_rows / args.batch_size) * args.epochs)


def read_checkpoint(out: str) -> dict | None:
    """The checkpoint of the run in `out` (None where it has none yet), checked: a truncated or foreign file is
    refused with one line, before any compute."""
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.exists(path):
        return None
    ckpt = read_checked(path, "checkpoint", lambda p: torch.load(p, map_location="cpu", weights_only=False),
                        "delete it to start over")
    if not isinstance(ckpt, dict) or not {"adapter", "optimizer", "schedule", "rng", "step", "best"} <= set(ckpt):
        raise UsageError(f"checkpoint {path} is not one finetune.py wrote; delete it to start over")
    return ckpt


def save_checkpoint(out, adapter, optimizer, schedule, step, best, seconds):
    """What --resume needs to continue at `step` exactly: weights, optimizer, schedule, RNG, the best so far."""
    with atomic(os.path.join(out, "checkpoint.pt")) as tmp:
        torch.save({"adapter": adapter.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "rng": torch.get_rng_state(), "step": step, "best": best,
                    "seconds": seconds}, tmp)


def restore(ckpt, adapter, optimizer, schedule) -> tuple[int, dict, float]:
    """(step, best, seconds so far) of the checkpoint, its states loaded; a fresh run's where there is none."""
    if ckpt is None:
        return 0, {"loss": math.inf, "step": 0, "state": None}, 0.0
    adapter.load_state_dict(ckpt["adapter"])
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["schedule"])
    torch.set_rng_state(ckpt["rng"])
    print(f"resuming at step {ckpt['step']}")
    return ckpt["step"], ckpt["best"], ckpt["seconds"]


def open_log(out: str, step: int, main_rank: bool):
    """log.jsonl, for appending: on resume cut back to the checkpoint's step (the steps after it run again)."""
    path = os.path.join(out, "log.jsonl")
    if not main_rank:
        return open(os.devnull, "a")
    kept = []
    if step and os.path.exists(path):
        def steps_so_far(p):
            with open(p, encoding="utf-8") as f:
                return [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        kept = read_checked(path, "training log", steps_so_far, "delete it and checkpoint.pt to start over")
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.writelines(kept)
    return open(path, "a")


def keep_best(best: dict, step: int, val_loss: float, adapter, out: str, main_rank: bool) -> dict:
    """The best adapter so far by validation loss: kept in memory and written to `out`."""
    if not val_loss < best["loss"]:
        return best
    if main_rank:
        save_adapter(adapter, out)
    return {"loss": val_loss, "step": step, "state": {k: v.detach().clone() for k, v in adapter.state_dict().items()}}


def train(model, adapter, train_seqs, val_seqs, pad_id, args, on_step=lambda step: None, ckpt=None):
    """The protocol's loop: batches in a seeded order per epoch, token-mean loss, backward, clip at 1.0, AdamW,
    linear warm-up then decay, validation every --eval-every steps keeping the best adapter. Continues from `ckpt`
    (read here with --resume when not given). Returns (best, steps run)."""
    params = [p for p in adapter.parameters() if p.requires_grad]
    # fused: one kernel for every parameter's update on CUDA, instead of a few per parameter
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=params[0].is_cuda or None)
    total = total_steps(len(train_seqs), args)
    steps_per_epoch = math.ceil(len(train_seqs) / args.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step / max(1, args.warmup) if step < args.warmup
                                                 else max(0.0, (total - step) / max(1, total - args.warmup)))
    main_rank = distributed.rank() == 0  # under torchrun only rank 0 reads the checkpoint, logs, writes
    os.makedirs(args.out, exist_ok=True)
    if args.resume and ckpt is None and main_rank:
        ckpt = read_checkpoint(args.out)
        if ckpt is None:
            print(f"--resume: no checkpoint in {args.out} yet; starting at step 0")
    step, best, elapsed = restore(distributed.from_rank0(ckpt if args.resume else None), adapter, optimizer, schedule)
    if not main_rank:  # dropout masks: a stream of each rank's own (rank 0's is the one-process run's)
        torch.manual_seed(hash((args.seed, distributed.rank(), step)))
    log = open_log(args.out, step, main_rank)
    bar = tqdm(total=total, initial=step, desc=f"training {adapter.method}", disable=args.no_progress)
    start_time = time.time() - elapsed  # the log's seconds run on across resumes
    while step < total:
        epoch, index = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_seqs), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        batch = [train_seqs[i] for i in order[index * args.batch_size:(index + 1) * args.batch_size]]
        loss = batch_loss(model, batch, pad_id, args.token_budget, backward=True)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step + 1}; lower --lr. The best adapter so far "
                                     f"(step {best['step']}) is in {args.out}")
        all_reduce_grads(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        step += 1
        entry = {"step": step, "loss": loss, "lr": schedule.get_last_lr()[0], "grad_norm": grad_norm,
                 "seconds": round(time.time() - start_time, 3)}
        if step % args.eval_every == 0 or step == total:
            adapter.eval()  # no dropout while measuring
            entry["val_loss"] = validation_loss(model, val_seqs, pad_id, args.token_budget)
            adapter.train()
            best = keep_best(best, step, entry["val_loss"], adapter, args.out, main_rank)
        if main_rank and ("val_loss" in entry or step % args.checkpoint_every == 0):
            save_checkpoint(args.out, adapter, optimizer, schedule, step, best, entry["seconds"])
        log.write(json.dumps(entry) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{entry['lr']:.2e}")
        bar.update(1)
        on_step(step)
    bar.close()
    log.close()
    if best["state"] is not None:  # no finite validation loss at all: keep the last state
        adapter.load_state_dict(best["state"])
    return best, step


# ---------------------------------------------------------------- main

def settle_run(args):
    """Fill in --model, --dataset and --prompt from the circuit file where the user left them out; return the
    circuit and the task. A circuit found on another model is refused; on another dataset or prompt style it is a
    choice, and warned of."""
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


def read_run(args, settings) -> tuple[dict | None, dict | None]:
    """With --resume, the interrupted run's record (before.json) and checkpoint, read and checked on rank 0 before
    the model loads: another run's settings are refused by name."""
    before_path = os.path.join(args.out, "before.json")
    record = ckpt = None
    if args.resume and distributed.rank() == 0:
        if os.path.exists(before_path):
            record = read_json(before_path, "run record", "delete it and checkpoint.pt to start over")
            check_same_run(before_path, record.get("settings", settings), settings)
        ckpt = read_checkpoint(args.out)
    return distributed.from_rank0(record), ckpt


def attach(model, circuit, args):
    """The adapter of --method, on the circuit (or random heads like it) for HeadMap."""
    torch.manual_seed(args.seed)  # adapter initialisation and dropout
    if args.method == "headmap":
        layers, heads = layers_and_heads(model)
        with refused(f"{args.heads} does not fit {args.model}"):
            check_circuit(circuit, layers, heads)
        if args.random_heads:
            circuit = random_circuit_like(circuit, heads, torch.Generator().manual_seed(args.seed))
        return attach_headmap(model, circuit, args.rank, args.scaling, args.variant)
    with refused(f"cannot attach {args.method}"):
        adapter = attach_lora(model, args.rank, args.alpha, args.dropout, dora=args.method == "dora")
    print(f"{args.method} targets: {', '.join(adapter.config['target_modules'])}")
    adapter.config["base_model_name_or_path"] = hub_id_of(args.model)  # what PEFT's AutoPeftModel loads
    return adapter


def eval_accuracy(model, tokenizer, task, examples, args, desc) -> float:
    """The task's metric: acc, or exact_match for a one-target task."""
    scores = score_continuations(model, tokenizer, examples, args.batch_size, not args.no_progress, desc)
    return metrics(task.kind, examples, scores)[PRIMARY[task.kind]]


def main(argv=None):
    args = parse_args(argv)
    circuit, task = settle_run(args)
    examples = task.examples(task.train_split, args.train_limit)
    source = task.source(task.train_split)  # the rows as read now, not as the file may be when training ends
    train_examples, val_examples, held_out = split_train_val(task, examples, args)
    val_examples = val_examples[:args.val_limit]
    print(f"{len(train_examples)} training rows of {task.train_split}; held out: {held_out}")
    if task.eval_split == task.train_split:  # one file (or only a train split): the held-out rows are all it has
        eval_split, eval_examples = "held-out rows", val_examples[:args.eval_limit]
        print(f"{task.name} has no evaluation split of its own: the accuracy is measured on the held-out rows")
    else:
        eval_split, eval_examples = task.eval_split, task.examples(task.eval_split, args.eval_limit)
    steps = total_steps(len(train_examples), args)
    if args.warmup >= steps:
        print(f"warning: --warmup {args.warmup} is not shorter than the run's {steps} steps, so the learning rate "
              f"peaks at {args.lr * steps / max(1, args.warmup):.2e}, not --lr {args.lr:.2e}; pass a smaller --warmup",
              file=sys.stderr)
    # what decides the result (not the checkpoint interval, progress bars or device): --resume must find the same
    settings = {k: getattr(args, k) for k in ("method", "variant", "random_heads", "dataset", "prompt", "model", "rank",
                                              "scaling", "alpha", "dropout", "lr", "batch_size", "token_budget",
                                              "epochs", "warmup", "max_steps", "max_length", "train_limit",
                                              "eval_every", "val_limit", "val_fraction", "eval_limit", "seed")}
    settings["circuit"] = {str(k): v for k, v in sorted(circuit.items())} if args.method == "headmap" else None
    distributed.start(pick_device(args.device))
    recorded_run, ckpt = read_run(args, settings)

    model, tokenizer = load_model(args.model, args.device, args.dtype)
    model.requires_grad_(False)
    adapter = attach(model, circuit, args)
    trainable = sum(p.numel() for p in adapter.parameters())
    total = sum(p.numel() for p in model.parameters()) + trainable
    print(f"{args.method}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.4f}%)")

    pad_id = pad_id_of(tokenizer)
    val_seqs = tokenize(tokenizer, val_examples, args.max_length)
    adapter.eval()  # modules start in training mode: no dropout while scoring
    if recorded_run is not None:  # the base model's numbers (the adapter starts as the identity), measured once
        before, val_loss_before = recorded_run["accuracy"], recorded_run["val_loss"]
    else:
        before = eval_accuracy(model, tokenizer, task, eval_examples, args, "accuracy before")
        val_loss_before = validation_loss(model, val_seqs, pad_id, args.token_budget)
        if distributed.rank() == 0:
            write_json(os.path.join(args.out, "before.json"),
                       {"accuracy": before, "val_loss": val_loss_before, "settings": settings})
    adapter.train()
    try:
        best, steps = train(model, adapter, tokenize(tokenizer, train_examples, args.max_length), val_seqs, pad_id,
                            args, ckpt=ckpt)
    except FloatingPointError as err:  # not bad input, so exit code 1; the best adapter so far stays on disk
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    adapter.eval()
    after = eval_accuracy(model, tokenizer, task, eval_examples, args, "accuracy after")

    record = {"method": adapter.method, "adapter": adapter.config, "base_model": args.model,
              "dataset": task.name, "prompt": task.prompt, "random_heads": args.random_heads, "kind": task.kind,
              "split": task.train_split, "data": source, "held_out": held_out,
              "eval_split": eval_split,
              "val_loss_before": val_loss_before, "best_val_loss": best["loss"], "best_step": best["step"],
              "steps": steps, "trainable_parameters": trainable,
              "hyper_parameters": {k: getattr(args, k) for k in ("lr", "batch_size", "token_budget", "epochs", "warmup",
                                   "max_steps", "max_length", "train_limit", "eval_every", "val_limit", "val_fraction",
                                   "seed")},
              "processes": distributed.world(), "metric": PRIMARY[task.kind], "accuracy_before": before,
              "accuracy_after": after,
              "eval_rows": len(eval_examples)}
    if distributed.rank() == 0:
        save_adapter(adapter, args.out)
        write_json(os.path.join(args.out, "training.json"), record)
        curves([args.out], os.path.join(args.out, "curves.svg"), title=f"{adapter.method} on {args.dataset}")
    print(f"{PRIMARY[task.kind]} on {len(eval_examples)} rows of {eval_split}: {before:.3f} -> {after:.3f} "
          f"(best validation loss {best['loss']:.4f} at step {best['step']}); adapter in {args.out}")
    return record


if __name__ == "__main__":
    run_script(main, resumable=True)
