"""What earlier runs recorded, and what follows from it: an option the user left out is taken from the adapter's
training.json or the circuit's heads.json (one that contradicts them is refused or warned of), the circuit and
adapter files are checked before any model loads, and locate's --samples-from takes an earlier run's samples.
(A --resume is checked against its run in run_folder.py.)
"""
import argparse
import json
import os
import sys

from .exits import UsageError, refused
from .json_records import read_json
from .run_folder import TRAINING
from headmap.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_input


CIRCUIT_FIX = ('pass a heads.json written by locate.py (or the official .pt file): {"knowledge_circuit": {layer: '
               '{"retain_heads": [head, ...]}}}')  # one wording wherever a circuit file is read (--heads, --mask)


def read_circuit_file(path: str) -> dict[int, list[int]]:
    from headmap.circuit import read_circuit
    return read_input(path, "circuit file", read_circuit, CIRCUIT_FIX)


def circuit_on(model, circuit: dict[int, list[int]], path: str, model_name: str, random_heads: bool,
               seed: int) -> dict[int, list[int]]:
    """The circuit of a file (--heads, --mask) checked against the loaded model (another model's is one line), or
    with `random_heads` random heads of the same per-layer counts (the paper's control), drawn with `seed`."""
    import torch

    from headmap.circuit import check_circuit, random_circuit_like
    from headmap.masking import layers_and_heads
    layers, heads = layers_and_heads(model)
    with refused(f"{path} does not fit {model_name}"):
        check_circuit(circuit, layers, heads)
    return random_circuit_like(circuit, heads, torch.Generator().manual_seed(seed)) if random_heads else circuit


def check_adapter_weights(folder: str) -> None:
    """An adapter folder's weights checked before any model loads: a truncated or garbled file is refused. Only the
    header is read (it must name tensors that exactly cover the file); load_adapter reads the tensors once, later."""
    from safetensors import safe_open

    def header(path):
        with safe_open(path, "pt") as f:
            return list(f.keys())
    read_input(os.path.join(folder, ADAPTER_WEIGHTS), "adapter weights", header,
                 "train it again (finetune.py) or copy it again")


def recorded(adapter: str | None = None, circuit: str | None = None) -> dict[str, dict[str, object]]:
    """What an adapter folder (finetune.py's training.json, else PEFT's adapter_config.json) and a circuit file
    (locate.py's heads.json) recorded of the run that made them: {setting: {file: value}}, for model, prompt,
    dataset, split and data (where the rows came from); settle() turns them into option values."""
    found: dict[str, dict[str, object]] = {"model": {}, "prompt": {}, "dataset": {}, "split": {}, "data": {}}
    sources = []
    if adapter:
        training = os.path.join(adapter, TRAINING)
        if os.path.exists(training):
            sources.append((training, "adapter record", {"model": "base_model", "prompt": "prompt",
                                                          "dataset": "dataset", "split": "split", "data": "data"}))
        else:  # a PEFT folder names its base model only
            sources.append((os.path.join(adapter, ADAPTER_CONFIG), "adapter config",
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
    """The task --dataset `name` with the script's --prompt, --data-dir and --target-delimiter; for one of the eight,
    the prompt style the user left out is what an adapter or circuit recorded (`prompt_records`, see settle)."""
    from data.tasks import open_task, takes_prompt
    prompt = args.prompt
    if takes_prompt(name):
        prompt = settle("prompt", prompt, prompt_records or {}, None, strict=False)
    return open_task(name, prompt, args.data_dir, args.target_delimiter)


def samples_from(path: str, settings: dict, source: dict, count: int) -> dict[str, list]:
    """The samples an earlier run chose (see select_samples), if it drew them from the same rows for the same model:
    all of them, or the `count` of lowest loss (the same as scoring the pool again would choose)."""
    earlier = read_json(path, "--samples-from", "pass a heads.json written by locate.py")
    if not isinstance(earlier, dict) or not isinstance(earlier.get("sample_indices"), list):
        raise UsageError(f"--samples-from {path} records no samples; pass a heads.json written by locate.py")
    same = {**{k: settings[k] for k in ("model", "dataset", "split", "pool", "prompt")}, "data": source}
    for key, value in json.loads(json.dumps(same)).items():  # as the file holds them
        if earlier.get(key) != value:
            raise UsageError(f"--samples-from {path}: its samples were chosen with {key} {earlier.get(key)!r}, not "
                             f"{value!r}; pass a run of the same model, task, split and pool")
    held = len(earlier["sample_indices"])
    if count > held:
        raise UsageError(f"--samples-from {path} holds {held} samples; pass --samples {held} or fewer")
    if count == held:
        return {"sample_indices": earlier["sample_indices"], "sample_losses": earlier.get("sample_losses")}
    if "sample_losses" not in earlier:  # runs before 2026-11-28 recorded none
        raise UsageError(f"--samples-from {path} records no sample losses, so its {count} lowest-loss samples are "
                         f"unknown; pass --samples {held}, or drop --samples-from")
    from data.samples import lowest_loss
    return lowest_loss(earlier["sample_indices"], earlier["sample_losses"], count)
