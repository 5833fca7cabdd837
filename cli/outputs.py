"""What the scripts write: every --out checked before the run by claim_out, the one "may --out be written" check
that every script calls from main before any model loads. It claims --out for this run (claim.py), refuses what
would replace anything of the user's without their flag, and keeps the run's inputs out of what it replaces.
"""
import argparse
import json
import os
import tempfile

from .claim import hold_output
from .exits import UsageError
from .run_folder import check_run_folder, heat_map_file, progress_file

MERGE_RECORD = "merge.json"  # beside merge.py's checkpoint: its files, the adapter and the base model
MERGED_FILES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".md")  # what save_pretrained writes: the
# config, weights (one file or shards and their index), tokenizer, chat template; and the card


# ---------------------------------------------------------------- --out

def claim_out(kind: str, out: str | None, overwrite: bool, args: argparse.Namespace | None = None,
              resume: bool = False, adapter: str | None = None) -> None:
    """May this run write --out `out`? Claimed for the run (a live run on it is named), then checked by `kind`:

    "file" (evaluate's results, plot's figure): a file that exists needs --overwrite. "circuit" (locate): the circuit
    file, its heat map and progress file; --resume may replace the first two, as --overwrite. "run" (finetune): a
    new or empty folder, or a run folder with --resume or --overwrite. "merged" (merge): a new folder, a previous
    merge's, or with --overwrite any folder of the user's that is not the adapter's, the current or the home folder.
    With `args`, no input of the run may lie in what it replaces. None (no --out): nothing to check."""
    if out is None:
        return
    hold_output(out)  # a live run in --out is named before anything else is said of it
    replaced = {"--out": out}
    if kind == "file":
        check_writable(out, overwrite)
    elif kind == "circuit":
        check_writable(out, overwrite or resume)
        check_writable(heat_map_file(out), overwrite or resume, "the heat map of --out")
        check_writable(progress_file(out), True, "the progress file of --out")
        replaced["the heat map of --out"] = heat_map_file(out)
        overwrite = overwrite or resume
    elif kind == "run":
        check_run_folder(out, resume, overwrite)
    elif kind == "merged":
        _check_merged_folder(out, adapter, overwrite)
        overwrite = True  # its own files are replaced either way
    else:
        raise ValueError(f"unknown kind of --out: {kind}")
    if overwrite and args is not None:
        check_inputs_kept(replaced, input_paths(args))


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
    --data-dir, --mask, --adapter, --heads, --samples-from, --device-map, and plot.py's input files (named by its
    figure), where the script has the option and it is set (check_inputs_kept skips values that name no path)."""
    found = [("--" + name.replace("_", "-"), getattr(args, name)) for name in
             ("model", "data_dir", "mask", "adapter", "heads", "samples_from", "device_map") if getattr(args, name, None)]
    figure_inputs = [getattr(args, "circuit", None)] + (getattr(args, "circuits", None) or getattr(args, "runs", None)
                                                         or [])
    return (found + [(args.figure, path) for path in figure_inputs if path]
            + [("--dataset", d.removeprefix("lm-eval:")) for d in (getattr(args, "dataset", None) or "").split(",") if d])


def _check_merged_folder(out: str, adapter: str, overwrite: bool) -> None:
    """Refuse an --out that would put anything the user made at risk: the adapter's folder or one above it, the
    current or home folder or one above them, never; a folder holding files this script did not write, unless
    --overwrite (and even then only files of the checkpoint's own names are replaced)."""
    for what, path in (("the adapter folder", adapter), ("the current folder", os.getcwd()),
                       ("your home folder", os.path.expanduser("~"))):
        if lies_in(path, out):
            same = os.path.realpath(path) == os.path.realpath(out)
            raise UsageError(f"--out {out} is {what}" + ("" if same else f" or holds it ({path})") +
                             "; pass a new folder for the merged checkpoint")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; pass a folder")
    clash = sorted(name for name in (os.listdir(out) if os.path.isdir(out) else [])
                   if name.endswith(MERGED_FILES) and os.path.isdir(os.path.join(out, name)))
    if clash:  # --overwrite writes the checkpoint's files one by one into the user's folder: not over a folder
        raise UsageError(f"--out {out} holds a folder {clash[0]}, where the checkpoint writes a file of that name; "
                         "move it away, or pass a new folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        ours = merged_files(out)
        others = sorted(set(os.listdir(out)) - set(ours or []))
        if ours is None or others:
            shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
            raise UsageError(f"--out {out} exists and holds files merge.py did not write ({shown}); pass a new "
                             "folder, or --overwrite to write into it (other files are kept)")


def merged_files(folder: str) -> list[str] | None:
    """The files a previous merge wrote into `folder` (its marker included), or None where it has no marker."""
    try:
        with open(os.path.join(folder, MERGE_RECORD)) as f:
            return list(json.load(f)["files"]) + [MERGE_RECORD]
    except (OSError, ValueError, KeyError, TypeError):
        return None
