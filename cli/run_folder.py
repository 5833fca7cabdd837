"""finetune.py's run folder, file by file (one constant each), and what --resume reads of it once; locate.py's
files beside its --out.

At the top of the folder what an upload needs (the adapter, its card, its record and log, the curves); in
RESUME_DIR what --resume needs (as Trainer keeps its checkpoint-N folders apart): the training state, the base
model's numbers with the run's settings, the trackers' run ids.
"""
import json
import math
import os
import time

from .exits import UsageError
from .json_records import read_json, write_json
from headmap.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEADMAP_CONFIG, read_input

TRAINING, LOG, CARD, CURVES = "training.json", "log.jsonl", "README.md", "curves.svg"
RUN_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEADMAP_CONFIG, CARD, TRAINING, LOG, CURVES)
RESUME_DIR = "resume"
CHECKPOINT, BEFORE, TRACKER_IDS = "checkpoint.pt", "before.json", "trackers.json"  # in RESUME_DIR


def check_run_folder(out: str, resume: bool, overwrite: bool) -> None:
    """finetune.py's --out: a new or empty folder, or one holding a run that --resume continues or --overwrite
    replaces (nothing of the user's is replaced without their flag)."""
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite starts a new one; pass one of them")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; pass a folder")
    for name in RUN_FILES + (os.path.join(RESUME_DIR, CHECKPOINT), os.path.join(RESUME_DIR, BEFORE)):
        if os.path.isdir(os.path.join(out, name)):
            raise UsageError(f"--out {out} holds a folder {name}, where the run writes its file {name}; move it "
                             "away, or pass another --out")
    if os.path.isfile(os.path.join(out, RESUME_DIR)):
        raise UsageError(f"--out {out} holds a file {RESUME_DIR}, where the run keeps its resumable state in a folder "
                         "of that name; move it away, or pass another --out")
    if os.path.isdir(out) and os.listdir(out) and not (resume or overwrite):
        raise UsageError(f"--out {out} holds files already (a run?); pass --resume to continue that run, "
                         "--overwrite to start a new one in it, or another --out")


def resume_file(out: str, name: str) -> str:
    """Where the resumable state `name` (CHECKPOINT, BEFORE) of the run in `out` lives."""
    return os.path.join(out, RESUME_DIR, name)


def read_run_state(out: str, resume: bool, settings: dict) -> tuple[dict | None, dict | None]:
    """With --resume, finetune.py's interrupted run in `out`, read once: its record (before.json: the base model's
    numbers and the run's settings) and its checkpoint, read and checked on rank 0 before the model loads (another
    run's settings are refused by name), then handed to every rank."""
    from headmap import distributed
    before_path = resume_file(out, BEFORE)
    record = ckpt = None
    if resume and distributed.rank() == 0:
        adopt_old_layout(out)
        if os.path.exists(before_path):
            record = read_json(before_path, "run record", f"delete {os.path.dirname(before_path)} to start over")
            check_same_run(before_path, record.get("settings", settings), settings)
        ckpt = _read_checkpoint(out)
    return distributed.from_rank0(record), distributed.from_rank0(ckpt)


def check_same_run(path: str, recorded: dict, given: dict) -> None:
    """--resume continues the run recorded in `path`, not another: every setting that decides the result must be
    the same; the first difference is refused by name. (A run recorded before may hold settings of other methods
    too: only the ones this run reads are compared.)"""
    for key in sorted(given):
        if recorded.get(key) != given.get(key):
            raise UsageError(f"--resume: {key} is {given.get(key)!r} here but {recorded.get(key)!r} in the run recorded "
                             f"in {path}; pass the same options to continue it, or drop --resume (another --out) "
                             "to start a new run")


def _read_checkpoint(out: str) -> dict | None:
    """The checkpoint of the run in `out` (None where it has none yet), checked: a truncated or foreign file, or one
    holding anything but tensors and plain values, is refused with one line, before any compute."""
    path = resume_file(out, CHECKPOINT)
    if not os.path.exists(path):
        return None
    import pickle

    import torch

    def load(p):  # tensors and plain values only: a pickled object in the file is refused, never run
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError("it holds more than tensors and plain values (pickled code?), so it was not loaded and "
                             "nothing in it ran") from None
    ckpt = read_input(path, "checkpoint", load, "delete it to start over")
    if not isinstance(ckpt, dict) or not {"adapter", "optimizer", "schedule", "rng", "step", "best"} <= set(ckpt):
        raise UsageError(f"checkpoint {path} is not one finetune.py wrote; delete it to start over")
    return ckpt


def write_checkpoint(out: str, state: dict) -> None:
    """The training state (train_adapter's checkpoint, and the seconds run so far) as RESUME_DIR/CHECKPOINT, whole."""
    import torch

    from headmap.files import atomic
    with atomic(resume_file(out, CHECKPOINT)) as tmp:
        torch.save(state, tmp)


def read_tracker_ids(out: str) -> dict | None:
    """The --report-to tracker runs of the run in `out` ({tracker: id}), for --resume to continue them."""
    path = resume_file(out, TRACKER_IDS)
    return read_json(path, "tracker ids", "delete it to start new tracker runs") if os.path.exists(path) else None


def adopt_old_layout(out: str) -> None:
    """A run written before the resumable state moved into RESUME_DIR kept it at the top of --out: move it there
    (the run's own files, renamed, not copied), so that such a run resumes and its folder becomes shareable."""
    for name in (CHECKPOINT, BEFORE):
        old = os.path.join(out, name)
        if os.path.isfile(old) and not os.path.exists(resume_file(out, name)):
            os.makedirs(os.path.join(out, RESUME_DIR), exist_ok=True)
            os.replace(old, resume_file(out, name))


class RunLog:
    """log.jsonl, appended one line a step. A line the disk has no room for is taken back whole (the file is cut
    to where it was) and raised as NoSpaceError: the log never holds half a line."""

    def __init__(self, path: str | None):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666) if path else None

    def write(self, entry: dict) -> None:
        if self.fd is None:
            return
        from headmap.files import space_for
        line = memoryview((json.dumps(entry) + "\n").encode())
        end = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            with space_for(self.path, self.path, len(line)):
                while line:  # a write may take only part of the line (a file-size limit reached mid-line)
                    line = line[os.write(self.fd, line):]
        except OSError:
            os.ftruncate(self.fd, end)
            raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def open_log(out: str, step: int, main_rank: bool) -> tuple[RunLog, int]:
    """log.jsonl, for appending: on resume cut back to the checkpoint's step (the steps after it run again; a line
    a killed run left half-written is among them). Also the last step it held before the cut: what the trackers
    of --report-to received already (-1: none)."""
    path = os.path.join(out, LOG)
    if not main_rank:
        return RunLog(None), -1
    lines = []
    if step and os.path.exists(path):
        def whole_lines(p):
            with open(p, encoding="utf-8") as f:
                found = [line for line in f if line.strip()]
            if found and not found[-1].endswith("\n"):
                found.pop()  # torn by a kill mid-write: a step after the checkpoint's
            return [(json.loads(line)["step"], line) for line in found]
        lines = read_input(path, "training log", whole_lines, f"delete it and {RESUME_DIR}/ to start over")
    from headmap.files import atomic
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.writelines(line for s, line in lines if s <= step)
    return RunLog(path), max((s for s, _ in lines), default=-1)


# ---------------------------------------------------------------- locate.py's files beside its --out

def heat_map_file(out: str) -> str:
    return os.path.splitext(out)[0] + ".svg"


def progress_file(out: str) -> str:
    """Where an unfinished search keeps what it has done (samples, layers so far), for --resume."""
    return out + ".progress.json"


def read_progress(out: str) -> dict | None:
    """The interrupted search of `out` (None where there is none), checked: another program's file is refused."""
    path = progress_file(out)
    if not os.path.exists(path):
        return None
    saved = read_json(path, "progress file", "delete it to start over")
    if not isinstance(saved, dict) or not {"settings", "circuit", "loss_matrix", "circuit_below_loss"} <= set(saved):
        raise UsageError(f"progress file {path} is not one locate.py wrote; delete it to start over")
    return saved


def write_run_files(out: str, adapter, record: dict, title: str) -> None:
    """The run folder's shareable files: the adapter, its record, its model card (ready for the Hub), the curves."""
    from .cards import write_model_card
    from .figures import curves
    from headmap.saving import save_adapter
    save_adapter(adapter, out)
    write_json(os.path.join(out, TRAINING), record)
    write_model_card(out, record)
    curves([out], os.path.join(out, CURVES), title=title)


def write_circuit_files(result: dict, out: str, reporter) -> None:
    """locate's outputs: the circuit file and its heat map (and the heat map as an image in the trackers); the
    progress file goes."""
    from .figures import heat_map
    from .trackers import tracker_folder
    from headmap import distributed
    if distributed.rank() == 0:
        write_json(out, result)
        heat_map(result, heat_map_file(out))
        if reporter.ids:
            png = os.path.join(tracker_folder(out), "heatmap.png")
            heat_map(result, png)
            reporter.image("heatmap", png, result["layers"] + 1)
        if os.path.exists(progress_file(out)):
            os.remove(progress_file(out))
    reporter.close()


# ---------------------------------------------------------------- training into the folder

def base_numbers(model, tokenizer, task, rows, run, recorded_run: dict | None, settings: dict):
    """The base model's accuracy and validation loss (the adapter starts as the identity), measured once and kept
    in RESUME_DIR/BEFORE with the run's `settings`: a resumed run reads them from its record (read_run_state's)."""
    from data.scoring import pad_id_of, task_metric
    from data.training import lm_batch, training_texts
    from headmap import distributed
    from headmap.train import batch_loss
    if recorded_run is not None:
        return recorded_run["accuracy"], recorded_run["val_loss"]
    # the loss first: a model whose logits the chunked loss cannot reproduce is refused before the long scoring
    val_loss = batch_loss(model, lm_batch(training_texts(tokenizer, rows.val, run.max_length), pad_id_of(tokenizer)),
                          run.token_budget, loss_chunks=run.loss_chunks)
    before = task_metric(model, tokenizer, task.kind, rows.eval, run.batch_size, not run.no_progress,
                         "accuracy before")
    if distributed.rank() == 0:
        write_json(resume_file(run.out, BEFORE),
                   {"accuracy": before, "val_loss": val_loss, "settings": settings})
    return before, val_loss



def total_steps(n_rows: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of the run: every epoch's batches, unless --max-steps stops it sooner."""
    return min(max_steps or 10 ** 12, math.ceil(n_rows / batch_size) * epochs)


def train_in_folder(model, adapter, train_seqs, val_seqs, pad_id, run, on_step=lambda step: None, ckpt=None,
          reporter=None, base: dict | None = None):
    """finetune.py's training: train_adapter with the run folder's files: the best adapter written to --out when it improves, a checkpoint every
    --checkpoint-every steps and at each validation, one log line per step, sent to the `reporter`'s trackers too
    (after `base`, the base model's numbers, at step 0). Continues from `ckpt` (run_folder.read_run_state's).
    Returns (best {"loss", "step"}, steps)."""
    from cli.trackers import NoReporter
    from data.training import epoch_batches, lm_batch
    from headmap import distributed
    from headmap.saving import save_adapter
    from headmap.train import train_adapter
    main_rank = distributed.rank() == 0  # under torchrun only rank 0 logs and writes
    os.makedirs(run.out, exist_ok=True)
    if ckpt:
        print(f"resuming at step {ckpt['step']}")
    elif run.resume:
        print(f"--resume: no checkpoint in {run.out} yet; starting at step 0")
    best = {k: v for k, v in (ckpt or {}).get("best", {"loss": math.inf, "step": 0}).items() if k != "state"}
    total = total_steps(len(train_seqs), run.batch_size, run.epochs, run.max_steps)
    reporter = reporter or NoReporter()
    log, reporter.sent = open_log(run.out, ckpt["step"] if ckpt else 0, main_rank)  # sent: not again
    reporter.log(base or {}, 0)
    start_time = time.time() - (ckpt["seconds"] if ckpt else 0.0)  # the log's seconds run on across resumes

    def after_step(entry, checkpoint):
        entry["seconds"] = round(time.time() - start_time, 3)
        if entry.pop("best", False):
            best.update(loss=entry["val_loss"], step=entry["step"])
            if main_rank:
                save_adapter(adapter, run.out)
        log.write(entry)  # before the checkpoint: a resume cuts the log back to the checkpoint's step, never short
        reporter.log(entry, entry["step"])
        if main_rank and ("val_loss" in entry or entry["step"] % run.checkpoint_every == 0):
            write_checkpoint(run.out, {**checkpoint(), "seconds": entry["seconds"]})
        on_step(entry["step"])

    try:
        train_adapter(model, adapter, epoch_batches(train_seqs, pad_id, run.batch_size, run.epochs, run.seed),
                      total, run.lr, run.warmup, token_budget=run.token_budget, eval_every=run.eval_every,
                      eval_batch=lm_batch(val_seqs, pad_id), resume=ckpt, on_step=after_step, seed=run.seed,
                      progress=not run.no_progress, activation_checkpointing=run.activation_checkpointing,
                      loss_chunks=run.loss_chunks, offload_activations=run.offload_activations)
    except FloatingPointError as err:  # run_script prints it (exit 1): not bad input
        raise FloatingPointError(f"{err}. The best adapter so far (step {best['step']}) is in {run.out}") from None
    finally:
        log.close()
    return best, total
