"""The claim that keeps two live runs off one --out: an flock the OS releases however the process ends."""
import json
import os
import sys

from .exits import UsageError

_held = {}  # path -> the open lock file, held until the process ends


def hold_output(out: str) -> None:
    """Claim --out for this run until the process ends: a second run on the same --out (and its progress file or
    checkpoint) is refused in one line naming the live one (pid, host, start). The claim is an flock on a hidden
    file beside --out, which the OS releases when the process dies however it dies (kill -9 too: nothing stale is
    left to clear); the file is removed at a normal exit. Under torchrun rank 0 claims it for the run."""
    import atexit
    import socket
    import time
    if os.environ.get("RANK", "0") != "0" or out in _held:
        return
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no claim
        return
    path = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(os.path.abspath(out))}.lock")
    while True:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            f = open(path, "a+")
        except OSError as err:
            raise UsageError(f"cannot write {out} ({err.strerror}); pass a writable path") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                owner = json.loads(f.read())
                who = f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
            except (ValueError, KeyError, TypeError):
                who = "its owner did not say which"
            f.close()
            raise UsageError(f"--out {out} is in use by a run still going ({who}); wait for it to end or stop it, or "
                             "pass another --out") from None
        try:  # the file may have been removed by the run that held it, between our open and our lock: open it anew
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:  # who holds it, for the refusal of a second run; a full disk leaves the claim unnamed, and still held
        f.truncate(0)
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": sys.argv}))
        f.flush()
    except OSError:
        pass
    _held[out] = f

    def release():
        try:
            os.unlink(path)  # while still held: a run waiting on the old file opens the path anew (above)
        except FileNotFoundError:
            pass
        f.close()
    atexit.register(release)
