"""Outputs written whole or not at all: the one atomic writer of the library and of the scripts; and the first
line of an error, which every one-line refusal quotes."""
import errno
import os
import shutil
import tempfile
from contextlib import contextmanager


class NoSpaceError(OSError):
    """The disk has no room for an output: the message says how much it needed (or had written when the disk filled
    up) and how much was free. Nothing of the output is left behind."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


@contextmanager
def atomic(path: str, folder: bool = False, size: int | None = None):
    """Yield a temporary file (or, with folder=True, an empty folder) beside `path` that takes its place when the
    block finishes: a crash mid-write leaves the previous file or folder, never half of one. A folder replaces a
    missing or empty one by a rename, an existing one by an exchange in one step (its old contents are deleted).
    `size`, the bytes the block will write where known, is checked against the free space first; a full disk
    raises NoSpaceError."""
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
    """Around the writing of `path` into `tmp` (a file or folder beside it): with `size`, the bytes it will take,
    refuse at once where the disk has less free; a write that fills the disk raises NoSpaceError saying so."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(tmp))).free
    if size is not None and size > free:
        raise NoSpaceError(f"no space for {path}: it needs about {_mb(size)}, the disk has {_mb(free)} free; free "
                           "some space or write it elsewhere")
    try:
        yield
    except Exception as err:
        if not disk_full(err, os.path.dirname(os.path.abspath(tmp))):
            raise
        needed = f"about {_mb(size)}" if size else f"more than the {_mb(_bytes_in(tmp))} written before it filled up"
        raise NoSpaceError(f"no space left on the disk of {path}: it needs {needed}, the disk had {_mb(free)} free; "
                           "free some space or write it elsewhere") from err


def disk_full(err: BaseException, folder: str) -> bool:
    """Whether a write failed for want of space: ENOSPC or EDQUOT, or a writer that reports it in words only
    (safetensors: "No space left on device"; torch.save: "file write failed") on a disk with under 1 MiB left."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(err) or shutil.disk_usage(folder).free < 2 ** 20


def _bytes_in(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:,.1f} MB" if n >= 2 ** 20 else f"{n / 2 ** 10:,.0f} KB"


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


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message (empty for an empty message), cut at `limit` characters."""
    return (str(err).strip().splitlines() or [""])[0][:limit]
