"""The scripts' command-line options shared between them (model, task, --out), their checks, and the path type that
expands ~. No torch here: --help answers at once."""
import argparse
import math
import os
from collections import namedtuple

from .exits import UsageError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: each option's default shown once (not where its help names it already, nor an absent
    one: None, or False for a switch), the description's line breaks kept."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def user_path(value: str) -> str:
    """A path option's value with ~ expanded as a shell would have (a quoted '~/runs' is the home folder's runs, not
    a folder named ~); each item of a comma list, and behind lm-eval:, too."""
    def expand(item: str) -> str:
        prefix = "lm-eval:" if item.startswith("lm-eval:") else ""
        return prefix + os.path.expanduser(item[len(prefix):])
    return ",".join(map(expand, value.split(",")))


def add_model_arguments(p: argparse.ArgumentParser, model_default: str | None, model_help: str,
                        device: str = "auto", dtype: str = "auto", device_map: bool = True, data: bool = True,
                        fsdp: bool = False) -> None:
    """--model, --trust-remote-code, --device, --dtype, --device-map where the script spreads a model over devices,
    and --data-dir and --no-progress for the scripts that read data."""
    from data.commonsense import DATA_DIR_HELP, default_data_dir
    p.add_argument("--model", default=model_default, type=user_path, help=model_help)
    p.add_argument("--trust-remote-code", action="store_true", help="let a model that ships its own Python code "
                   "(auto_map in its config.json) run it, as transformers' trust_remote_code=True; only for code you "
                   "trust")
    p.add_argument("--device", default=device, help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=dtype, help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16")
    if device_map:
        p.add_argument("--device-map", type=user_path, help="spread the model over several devices (accelerate): "
                       "auto, balanced, sequential, or a JSON map {module name: device}, as a file or a string; "
                       "overrides --device")
    if fsdp:
        p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the frozen model over the processes "
                       "with FSDP2 (each holds 1/world of its weights), for a model larger than one GPU")
    if data:
        p.add_argument("--data-dir", default=default_data_dir(), type=user_path, help=DATA_DIR_HELP)
        p.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' too)")


def add_task_arguments(p: argparse.ArgumentParser, dataset_help: str, prompt_help: str) -> None:
    """--dataset and the options that shape a task's prompts: --prompt for the eight datasets, --target-delimiter for
    the user's own files."""
    from data.commonsense import PROMPT_STYLES
    p.add_argument("--dataset", type=user_path, help=dataset_help + "; or your own rows: a "
                   ".jsonl/.jsonl.gz/.json/.csv/.parquet "
                   "file or a folder of train/validation/test files (README: Your own task); or lm-eval:TASK, any "
                   "multiple-choice task of lm-evaluation-harness (a task name or a task YAML file)")
    p.add_argument("--prompt", choices=PROMPT_STYLES, help=prompt_help)
    p.add_argument("--target-delimiter", help="your own file: what joins the prompt and each choice or target "
                   "(default: one space, as lm-evaluation-harness's target_delimiter)")


def add_out_arguments(p: argparse.ArgumentParser, out_help: str, default: str | None = None, required: bool = False,
                      overwrite_help: str = "replace an existing --out") -> None:
    """--out and the --overwrite that lets it replace a file: nothing of the user's is replaced without their flag
    (check_writable enforces it before the run)."""
    p.add_argument("--out", default=default, required=required, type=user_path, help=out_help)
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)


def check_at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            hint = " (0 = all rows)" if minimum == 0 else ""
            raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum}{hint}, got {value}")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number above 0, got {value}")


def settled(args: argparse.Namespace, **decided):
    """A run's settings, fixed once: the options as parsed, with what was `decided` from them and from the files
    of earlier runs (a model the user left out, the method's learning rate ...). Read-only from here on (a named
    tuple), so every later step sees the same values."""
    values = {**vars(args), **decided}
    return namedtuple("Settings", values)(**values)
