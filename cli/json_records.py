"""The JSON a run records (results, circuits, run records), written whole and read back checked: a file handed over
is read through headmap.files.read_input (one line naming the file and the fix), and no file a run reads runs code
(JSON, safetensors, or torch.load with weights_only=True)."""
import json

from headmap.files import atomic, read_input


def read_json(path: str, what: str, fix: str = "fix it or pass another file") -> dict:
    def load(p):
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    return read_input(path, what, load, fix)


def write_json(path: str, obj) -> None:
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def software_versions() -> dict[str, str]:
    """The versions a run's record names, so that a number can be traced to the software that produced it."""
    import platform

    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
