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
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes the file private; an output reads like any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def read_checked(path: str, what: str, load, fix: str):
    """The one way the scripts read a file the user handed them or an earlier run left: `load(path)`, or a
    one-line error naming the file, what is wrong with it (truncated, corrupt, not UTF-8 ...) and `fix`."""
    from kernels.model import UsageError
    try:
        return load(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except Exception as err:  # any parser's complaint about the file's content: the file is the problem
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"{what} {path} cannot be read ({type(err).__name__}: {detail}); {fix}") from None


def read_json(path: str, what: str, fix: str = "fix it or pass another file") -> dict:
    """A JSON file, through read_checked."""
    def load(p):
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    return read_checked(path, what, load, fix)


def check_adapter_weights(folder: str) -> None:
    """An adapter folder's weights read once, before any model loads: a truncated or corrupt file is refused."""
    from safetensors.torch import load_file
    read_checked(os.path.join(folder, "adapter_model.safetensors"), "adapter weights", load_file,
                 "train it again (finetune.py) or copy it again")


def check_same_run(path: str, recorded: dict, given: dict) -> None:
    """--resume continues the run recorded in `path`, not another: every setting that decides the result must be
    the same; the first difference is refused by name."""
    from kernels.model import UsageError
    for key in sorted(set(recorded) | set(given)):
        if recorded.get(key) != given.get(key):
            raise UsageError(f"--resume: {key} is {given.get(key)!r} here but {recorded.get(key)!r} in the run recorded "
                             f"in {path}; pass the same options to continue it, or drop --resume (another --out) "
                             "to start a new run")


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
