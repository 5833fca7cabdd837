"""Small file helpers: outputs are written whole or not at all."""
import json
import os
import tempfile


def write_json(path: str, obj) -> None:
    """Write JSON atomically: a crash mid-write leaves the previous file, never half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; an output file should read like any other
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_writable(path: str) -> None:
    """Fail before a long run, not after it, when the output cannot be written."""
    from kernels.model import UsageError
    folder = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as err:
        raise UsageError(f"cannot write {path} ({err.strerror}); pass a writable path") from None
