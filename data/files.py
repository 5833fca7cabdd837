"""Small file helpers: outputs are written whole or not at all."""
import json
import os
import sys
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic(path: str):
    """A temporary path beside `path` (same extension) that replaces `path` when the block finishes: a crash
    mid-write leaves the previous file, never half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; an output file should read like any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj) -> None:
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


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


def read_json(path: str, what: str) -> dict:
    """A JSON file the user pointed at, or a one-line error saying what is wrong with it."""
    from kernels.model import UsageError
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{what} {path} is not valid JSON ({err})") from None


def settle(option: str, given, recorded: dict, default, force: bool = False, strict: bool = True):
    """The value of --option: `given` if the user passed it, else what the metadata files in `recorded` ({file:
    value}) say (and a note on stderr says so), else `default`. A value that contradicts a file's record is
    refused when `strict` (the numbers would be silently wrong) unless --force, and warned about otherwise."""
    from kernels.model import UsageError
    records = {source: value for source, value in recorded.items() if value is not None}
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
