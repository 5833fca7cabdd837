"""GGUF model files: checked against their own header before transformers reads them (a download cut short is
one line), and de-quantised once into a cached safetensors checkpoint, one process at a time.
"""
import hashlib
import os
import struct
from contextlib import contextmanager
from pathlib import Path

from .exits import UsageError


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
    import transformers
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    shown = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "de-quantising ..." says it; the model's load shows the bar
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    finally:
        if shown:
            transformers.utils.logging.enable_progress_bar()
    # The weights are plain floats now; the GGUF marker would make transformers refuse to save them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic(str(target), folder=True) as tmp:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"))  # save_model handles the tied embedding
        write_source(Path(tmp), os.path.join(folder, gguf_file))


SOURCE = "source.json"  # in a conversion's cache folder: the GGUF file it came from


def write_source(cached: Path, gguf_path: str) -> dict:
    """What a de-quantised copy was made from (the GGUF file's path, size, quantisation and sha256), kept beside it so
    that a run records the weights it actually trained on without hashing the file again."""
    import json

    from gguf import GGUFReader

    from headmap.files import atomic
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for block in iter(lambda: f.read(2 ** 22), b""):
            digest.update(block)
    kinds = sorted({t.tensor_type.name for t in GGUFReader(gguf_path).tensors} - {"F32", "F16", "BF16"})
    source = {"gguf_file": os.path.abspath(gguf_path), "bytes": os.path.getsize(gguf_path),
              "sha256": digest.hexdigest(), "quantisation": "+".join(kinds) or "none", "dequantised_to": "float32"}
    with atomic(str(cached / SOURCE)) as tmp, open(tmp, "w") as f:
        json.dump(source, f, indent=1)
    return source


def read_source(cached: Path, gguf_path: str) -> dict:
    """The record write_source kept with a conversion (made now for a cache written before it kept one)."""
    import json
    try:
        with open(cached / SOURCE, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return write_source(cached, gguf_path)


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
