"""The files a script reads and writes beyond its data: outputs checked before the run and written whole, the
user's inputs kept out of what a run replaces, run folders with their checkpoint and log, and the claim that keeps
two runs off one --out. (What those files recorded, and what follows from it, is records.py's.)

Every file a user hands over or an earlier run left is read through data.files.read_checked (one line naming the
file and the fix) and never runs code: JSON, safetensors, or torch.load with weights_only=True.
"""
import argparse
import json
import os
import sys
import tempfile

from cli import UsageError
from data.files import read_checked


def read_json(path: str, what: str, fix: str = "fix it or pass another file") -> dict:
    def load(p):
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    return read_checked(path, what, load, fix)


def software_versions() -> dict[str, str]:
    """The versions a run's record names, so that a number can be traced to the software that produced it."""
    import platform

    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def write_json(path: str, obj) -> None:
    from headmap.files import atomic
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def check_writable(path: str, overwrite: bool, what: str = "--out") -> None:
    """Fail before a long run, not after it: an output file that exists is kept unless the user passed --overwrite
    (nothing of theirs is replaced without their flag), a folder where the file goes is refused either way, and a
    path that cannot be written is named. `what` names the output in the message."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a folder, where a file is written; pass a file's path")
    if os.path.exists(path) and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it, or another --out")
    folder = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as err:
        raise UsageError(f"cannot write {path} ({err.strerror}); pass a writable path") from None


def check_inputs_kept(replaced: dict[str, str], inputs: list[tuple[str, str]]) -> None:
    """Refuse, before any work, an input that lies in an output this run would replace ({flag: path}; inputs as
    input_paths gives them): an input file that is the output file, or any input inside the output folder. Inputs
    that name no existing path (hub ids, dataset names) cannot be."""
    for out_flag, out in replaced.items():
        for in_flag, path in inputs:
            if path and os.path.exists(path) and lies_in(path, out):
                where = "is" if os.path.realpath(path) == os.path.realpath(out) else "lies inside"
                raise UsageError(f"{in_flag} {path} {where} {out_flag} {out}, which this run replaces; move it "
                                 f"elsewhere first, or pass another {out_flag}")


def lies_in(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies anywhere inside it (links resolved)."""
    real, target = os.path.realpath(path), os.path.realpath(folder)
    return real == target or real.startswith(target.rstrip(os.sep) + os.sep)


def input_paths(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(flag, path) of what a script reads: --model, each --dataset (a file, a folder, an lm-eval task YAML),
    --data-dir, --mask, --adapter, --heads, --samples-from, --device-map, where the script has the flag and it is
    set (check_inputs_kept skips values that name no path)."""
    found = [("--" + name.replace("_", "-"), getattr(args, name)) for name in
             ("model", "data_dir", "mask", "adapter", "heads", "samples_from", "device_map") if getattr(args, name, None)]
    return found + [("--dataset", d.removeprefix("lm-eval:")) for d in (getattr(args, "dataset", None) or "").split(",")
                    if d]


# finetune.py's --out: at the top what an upload needs (the adapter, its card, its record and log, the curves);
# what --resume needs lives apart in RESUME_DIR, as Trainer keeps its checkpoint-N folders apart
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "headmap.json", "README.md", "training.json",
             "log.jsonl", "curves.svg")
RESUME_DIR = "resume"
# in RESUME_DIR: the training state, the base model's numbers, the --report-to trackers' run ids
CHECKPOINT, BEFORE, TRACKER_IDS = "checkpoint.pt", "before.json", "trackers.json"


def resume_file(out: str, name: str) -> str:
    """Where the resumable state `name` (CHECKPOINT, BEFORE) of the run in `out` lives."""
    return os.path.join(out, RESUME_DIR, name)


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


def check_run_folder(out: str, resume: bool, overwrite: bool, inputs: list[tuple[str, str]]) -> None:
    """A run's --out folder: a new or empty one, or one holding a run that --resume continues or --overwrite
    replaces (nothing of the user's is replaced without their flag; none of the run's `inputs` may lie in a folder
    --overwrite replaces)."""
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
    if overwrite:
        check_inputs_kept({"--out": out}, inputs)


def read_checkpoint(out: str) -> dict | None:
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
    ckpt = read_checked(path, "checkpoint", load, "delete it to start over")
    if not isinstance(ckpt, dict) or not {"adapter", "optimizer", "schedule", "rng", "step", "best"} <= set(ckpt):
        raise UsageError(f"checkpoint {path} is not one finetune.py wrote; delete it to start over")
    return ckpt


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
    path = os.path.join(out, "log.jsonl")
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
        lines = read_checked(path, "training log", whole_lines, f"delete it and {RESUME_DIR}/ to start over")
    from headmap.files import atomic
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.writelines(line for s, line in lines if s <= step)
    return RunLog(path), max((s for s, _ in lines), default=-1)


_held = {}  # path -> the open lock file, held until the process ends


def hold_output(out: str) -> None:
    """Claim --out for this run until the process ends: a second run on the same --out (and its progress file or
    checkpoint) is refused in one line naming the live one (pid, host, start). The claim is an flock on a hidden
    file beside --out, which the OS releases when the process dies however it dies (kill -9 too: nothing stale is
    left to clear); the file is removed at a normal exit. Under torchrun rank 0 claims it for the run."""
    import atexit
    import socket
    import time
    if os.environ.get("RANK", "0") != "0" or out in _held:
        return
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no claim
        return
    path = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(os.path.abspath(out))}.lock")
    while True:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            f = open(path, "a+")
        except OSError as err:
            raise UsageError(f"cannot write {out} ({err.strerror}); pass a writable path") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                owner = json.loads(f.read())
                who = f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
            except (ValueError, KeyError, TypeError):
                who = "its owner did not say which"
            f.close()
            raise UsageError(f"--out {out} is in use by a run still going ({who}); wait for it to end or stop it, or "
                             "pass another --out") from None
        try:  # the file may have been removed by the run that held it, between our open and our lock: open it anew
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:  # who holds it, for the refusal of a second run; a full disk leaves the claim unnamed, and still held
        f.truncate(0)
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": sys.argv}))
        f.flush()
    except OSError:
        pass
    _held[out] = f

    def release():
        try:
            os.unlink(path)  # while still held: a run waiting on the old file opens the path anew (above)
        except FileNotFoundError:
            pass
        f.close()
    atexit.register(release)
