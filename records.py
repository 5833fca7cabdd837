"""What earlier runs recorded, and what follows from it: an option the user left out is taken from the adapter's
training.json or the circuit's heads.json (one that contradicts them is refused or warned of), a --resume is checked
against the settings of the run it continues, and the circuit and adapter files are checked before any model loads.
"""
import argparse
import os
import sys

from cli import UsageError
from data.files import read_checked
from runs import BEFORE, adopt_old_layout, read_checkpoint, read_json, resume_file


CIRCUIT_FIX = ('pass a heads.json written by locate.py (or the official .pt file): {"knowledge_circuit": {layer: '
               '{"retain_heads": [head, ...]}}}')  # one wording wherever a circuit file is read (--heads, --mask)


def read_circuit_file(path: str) -> dict[int, list[int]]:
    from headmap.circuit import read_circuit
    return read_checked(path, "circuit file", read_circuit, CIRCUIT_FIX)


def check_adapter_weights(folder: str) -> None:
    """An adapter folder's weights checked before any model loads: a truncated or garbled file is refused. Only the
    header is read (it must name tensors that exactly cover the file); load_adapter reads the tensors once, later."""
    from safetensors import safe_open

    def header(path):
        with safe_open(path, "pt") as f:
            return list(f.keys())
    read_checked(os.path.join(folder, "adapter_model.safetensors"), "adapter weights", header,
                 "train it again (finetune.py) or copy it again")


def recorded(adapter: str | None = None, circuit: str | None = None) -> dict[str, dict[str, object]]:
    """What an adapter folder (finetune.py's training.json, else PEFT's adapter_config.json) and a circuit file
    (locate.py's heads.json) recorded of the run that made them: {setting: {file: value}}, for model, prompt,
    dataset, split and data (where the rows came from); settle() turns them into option values."""
    found: dict[str, dict[str, object]] = {"model": {}, "prompt": {}, "dataset": {}, "split": {}, "data": {}}
    sources = []
    if adapter:
        training = os.path.join(adapter, "training.json")
        if os.path.exists(training):
            sources.append((training, "adapter record", {"model": "base_model", "prompt": "prompt",
                                                          "dataset": "dataset", "split": "split", "data": "data"}))
        else:  # a PEFT folder names its base model only
            sources.append((os.path.join(adapter, "adapter_config.json"), "adapter config",
                            {"model": "base_model_name_or_path"}))
    if circuit and circuit.endswith(".json"):  # the official .pt circuit records nothing else
        sources.append((circuit, "circuit file", {"model": "model", "prompt": "prompt", "dataset": "dataset",
                                                  "split": "split", "data": "data"}))
    for path, what, keys in sources:
        meta = read_json(path, what, *([CIRCUIT_FIX] if what == "circuit file" else []))
        if not isinstance(meta, dict):
            raise UsageError(f"{what} {path} is not a JSON object; fix it or pass another file")
        for setting, key in keys.items():
            found[setting][path] = meta.get(key)
    return found


def settle(option: str, given, records: dict, default, force: bool = False, strict: bool = True):
    """The value of --option: `given` if the user passed it, else what the files in `records` ({file: value}) say
    (and a note on stderr says so), else `default`. A value that contradicts a file's record is refused when
    `strict` (the numbers would be silently wrong) unless --force, and warned about otherwise."""
    records = {source: value for source, value in records.items() if value is not None}
    value = given
    if value is None and records:
        source, value = next(iter(records.items()))
        print(f"note: --{option} {value} (from {source})", file=sys.stderr)
    for source, other in records.items():
        if other != value:
            problem = f"--{option} {value} differs from {other} recorded in {source}"
            if strict and not force:
                raise UsageError(f"{problem}; pass --force to use it anyway")
            print(f"warning: {problem}", file=sys.stderr)
    return default if value is None else value


def open_task_for(name: str, args: argparse.Namespace, prompt_records: dict | None = None):
    """The task `name` with the script's options: the prompt style (one of the eight only) from --prompt, else what
    an adapter or circuit recorded (`prompt_records`, see settle), else paper."""
    from data.commonsense import DATASETS
    from data.tasks import open_task
    prompt = args.prompt
    if name in DATASETS:
        prompt = settle("prompt", prompt, prompt_records or {}, "paper", strict=False)
    return open_task(name, prompt, args.data_dir, args.target_delimiter)


def check_same_run(path: str, recorded: dict, given: dict) -> None:
    """--resume continues the run recorded in `path`, not another: every setting that decides the result must be
    the same; the first difference is refused by name. (A run recorded before may hold settings of other methods
    too: only the ones this run reads are compared.)"""
    for key in sorted(given):
        if recorded.get(key) != given.get(key):
            raise UsageError(f"--resume: {key} is {given.get(key)!r} here but {recorded.get(key)!r} in the run recorded "
                             f"in {path}; pass the same options to continue it, or drop --resume (another --out) "
                             "to start a new run")


def read_interrupted_run(out: str, resume: bool, settings: dict) -> tuple[dict | None, dict | None]:
    """With --resume, finetune.py's interrupted run in `out`: its record (before.json) and checkpoint, read and checked
    on rank 0 before the model loads (another run's settings are refused by name)."""
    from headmap import distributed
    before_path = resume_file(out, BEFORE)
    record = ckpt = None
    if resume and distributed.rank() == 0:
        adopt_old_layout(out)
        if os.path.exists(before_path):
            record = read_json(before_path, "run record", f"delete {os.path.dirname(before_path)} to start over")
            check_same_run(before_path, record.get("settings", settings), settings)
        ckpt = read_checkpoint(out)
    return distributed.from_rank0(record), ckpt
