"""open_task: the task a `--dataset` value names, one of three kinds, each in its own module: one of the paper's
eight commonsense datasets (data/commonsense.py), a file or folder of the user's own rows (data/user_files.py), or an
lm-evaluation-harness task (data/lm_eval_tasks.py). Every task turns its rows into `Example`s (data/common.py).
This module imports down only: the three kinds know nothing of it.
"""
import os

from data.common import Task
from data.commonsense import DATASETS, DEFAULT_PROMPT, Commonsense, default_data_dir, did_you_mean
from data.files import FILE_FORMATS, DataError
from data.lm_eval_tasks import LmEvalTask
from data.user_files import FileTask


def open_task(name: str, prompt: str | None = None, data_dir: str | None = None, delimiter: str | None = None) -> Task:
    """The task `--dataset name` names: one of the eight, `lm-eval:TASK` (a registered task or a task YAML file), or
    a path (a .jsonl/.jsonl.gz/.json/.csv/.parquet file or a folder of split files). `prompt` and `data_dir` apply
    to the eight only, `delimiter` (between prompt and answer, default " ") to files only: elsewhere they are
    refused, since they would change nothing."""
    if name.startswith("lm-eval:"):
        refuse_options(name, prompt=prompt, delimiter=delimiter)
        return LmEvalTask(name[len("lm-eval:"):])
    if takes_prompt(name):
        refuse_options(name, delimiter=delimiter)
        return Commonsense(name, prompt or DEFAULT_PROMPT, data_dir or default_data_dir())
    if os.path.sep in name or os.path.exists(name) or name.endswith(FILE_FORMATS):
        refuse_options(name, prompt=prompt)
        return FileTask(name, " " if delimiter is None else delimiter)
    raise DataError(f"unknown dataset {name!r}{did_you_mean(name)}: pass one of {', '.join(DATASETS)}, a file or "
                    "folder of your own rows (README: Your own task), or lm-eval:TASK")


def takes_prompt(name: str) -> bool:
    """Whether --dataset `name` is one of the eight, whose prompt style --prompt picks (else DEFAULT_PROMPT)."""
    return name in DATASETS


def refuse_options(name: str, **given) -> None:
    option = {"prompt": "--prompt (the eight datasets' prompt style)",
              "delimiter": "--target-delimiter (between a file's prompts and answers)"}
    for key, value in given.items():
        if value is not None:
            raise DataError(f"{option[key]} does not apply to --dataset {name}; drop it")
