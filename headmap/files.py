"""Outputs written whole or not at all: the one atomic writer of the library and of the scripts."""
import os
import shutil
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic(path: str, folder: bool = False):
    """Yield a temporary file (or, with folder=True, an empty folder) beside `path` that takes its place when the
    block finishes: a crash mid-write leaves the previous file or folder, never half of one. A folder replaces a
    missing or empty one by a rename, an existing one by an exchange in one step (its old contents are deleted)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if folder:
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    else:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-", suffix=os.path.splitext(path)[1])
        os.close(fd)
    try:
        yield tmp
        # mkstemp and mkdtemp make their results private; an output reads like any other file the user writes
        os.chmod(tmp, (0o777 if folder else 0o666) & ~current_umask())
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
