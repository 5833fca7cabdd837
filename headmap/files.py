"""Files in and out. In: read_input, the one checked reader of a file handed over (a bad one is one line naming it
and the fix). Out: written whole or not at all, through the one atomic writer of the library and of the scripts,
and the check that says, as NoSpaceError, which write did not fit."""
import errno
import os
import shutil
import tempfile
from contextlib import contextmanager

from .errors import NoSpaceError, UnreadableFile, error_summary

# an adapter folder (save_adapter): PEFT's two files, and what HeadMap adds beside them, where PEFT does not read it
# (an unknown field in adapter_config.json would make PEFT warn)
ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEADMAP_CONFIG = "adapter_config.json", "adapter_model.safetensors", "headmap.json"


@contextmanager
def atomic(path: str, folder: bool = False, size: int | None = None):
    """Yield a temporary file (or, with folder=True, an empty folder) beside `path` that takes its place when the
    block finishes: a crash mid-write leaves the previous file or folder, never half of one. A folder replaces a
    missing or empty one by a rename, an existing one by an exchange in one step (its old contents are deleted).
    `size`, the bytes the block will write where known, is checked against the free space first; a write that does
    not fit raises NoSpaceError."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if folder:
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    else:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-", suffix=os.path.splitext(path)[1])
        os.close(fd)
    try:
        with space_for(path, tmp, size):
            yield tmp
            # mkstemp and mkdtemp make their results private, and so do some writers inside a folder (safetensors):
            # an output reads like any other file the user writes (a colleague on the cluster reads the checkpoint)
            readable(tmp)
            if folder and os.path.isdir(path) and os.listdir(path):
                _exchange(tmp, path)  # tmp now holds the old folder, deleted below
            else:
                if folder and os.path.isdir(path):
                    os.rmdir(path)
                os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def space_for(path: str, tmp: str, size: int | None = None):
    """Around the writing of `path` into `tmp` (a file or folder beside it, or `path` itself for a file appended
    to): with `size`, the bytes it will take, refuse at once where the disk has less free; a write that does not fit
    (a full disk, a used-up quota, the file-size limit) raises NoSpaceError saying which."""
    folder = os.path.dirname(os.path.abspath(tmp))
    free = shutil.disk_usage(folder).free
    if size is not None and size > free:
        raise NoSpaceError(f"no space for {path}: it needs about {_mb(size)}, the disk has {_mb(free)} free; nothing "
                           "was written; free some space or write it elsewhere")
    try:
        yield
    except Exception as err:
        reason = no_room(err, tmp)
        if reason is None:
            raise
        needed = f"about {_mb(size)}" if size else f"more than the {_mb(_bytes_in(tmp))} written before it failed"
        if reason == errno.EFBIG:
            limit = _size_limit()
            what = "file too large"
            why = (f"it would pass this process's file-size limit (ulimit -f) of {_mb(limit)}" if limit is not None
                   else "it is larger than the file system allows")
            fix = "raise the limit or write it elsewhere"
        elif reason == errno.EDQUOT:
            what, why, fix = "quota exceeded", "your disk quota is used up", "free some space or ask for a larger quota"
        else:
            what, why, fix = "no space left", f"the disk had {_mb(free)} free", "free some space or write it elsewhere"
        raise NoSpaceError(f"{what} writing {path}: it needs {needed}, {why}; nothing earlier was changed; {fix}",
                           reason) from err


# how writers that do not raise an OSError say why a write failed: (safetensors: "No space left on device (os error
# 28)"; torch.save: "unexpected pos ... vs ..." or "file write failed", with no reason at all)
_REASONS = {errno.ENOSPC: ("No space left on device", "os error 28"),
            errno.EFBIG: ("File too large", "os error 27"),
            errno.EDQUOT: ("Disk quota exceeded", "os error 122")}
_SILENT_WRITE_FAILURES = ("unexpected pos", "file write failed")


def no_room(err: BaseException, tmp: str) -> int | None:
    """Why a write into `tmp` failed for want of room (errno.ENOSPC, EFBIG or EDQUOT), or None where it failed for
    another reason. An OSError says it by its errno, safetensors in words; torch.save says only that the write
    failed, so the file-size limit and the free space tell which."""
    if isinstance(err, OSError) and err.errno in _REASONS:
        return err.errno
    text = str(err)
    for code, words in _REASONS.items():
        if any(w in text for w in words):
            return code
    limit, folder = _size_limit(), os.path.dirname(os.path.abspath(tmp))
    silent = any(w in text for w in _SILENT_WRITE_FAILURES)
    if (silent or isinstance(err, OSError)) and limit is not None and _largest_file(tmp) >= limit - 2 ** 16:
        return errno.EFBIG
    if shutil.disk_usage(folder).free < 2 ** 20:
        return errno.ENOSPC
    return errno.EDQUOT if silent else None  # a short write with room on the disk and under the limit: a quota


def _size_limit() -> int | None:
    """The process's file-size limit (RLIMIT_FSIZE) in bytes, None where there is none."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _largest_file(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    sizes = [os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files]
    return max(sizes, default=0)


def _bytes_in(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:,.1f} MB" if n >= 2 ** 20 else f"{n / 2 ** 10:,.0f} KB" if n >= 2 ** 10 else f"{n} bytes"


def readable(path: str) -> None:
    """Give `path` (and all inside it, for a folder) the mode a plain open() or mkdir() gives under the umask:
    0666 (0777 for folders and executables) less the umask."""
    umask = current_umask()
    for root, dirs, files in os.walk(path) if os.path.isdir(path) else [("", [], [path])]:
        for name in dirs + files:
            item = os.path.join(root, name)
            executable = os.path.isdir(item) or os.stat(item).st_mode & 0o111
            os.chmod(item, (0o777 if executable else 0o666) & ~umask)
    if os.path.isdir(path):
        os.chmod(path, 0o777 & ~umask)


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exchange(a: str, b: str) -> None:
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE); elsewhere, three renames."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        if libc.renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0:
            return
    except (AttributeError, OSError):
        pass
    aside = a + ".old"
    os.replace(b, aside)
    os.replace(a, b)
    os.replace(aside, a)


def read_input(path: str, what: str, load, fix: str):
    """`load(path)`, or UnreadableFile naming `what` and the file, what is wrong with it (missing, truncated, corrupt,
    not UTF-8, not the expected content ...) and `fix`."""
    try:
        return load(path)
    except FileNotFoundError:
        raise UnreadableFile(f"{what} {path} does not exist; {fix}") from None
    except Exception as err:  # any parser's complaint about the file's content: the file is the problem
        raise UnreadableFile(f"{what} {path} cannot be read ({type(err).__name__}: {error_summary(err, 200)}); "
                             f"{fix}") from None
