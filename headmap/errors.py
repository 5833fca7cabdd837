"""The library's exceptions, and the one-line reason its refusals and the scripts quote. No torch here: a program
catches these without loading it."""
import errno


class UnsupportedModel(ValueError):
    """The model does something head masking (or scoring) cannot reproduce exactly, or cannot run at all."""


class UnreadableFile(ValueError):
    """A file handed over cannot be used: it is missing, truncated, corrupt, not UTF-8 or not what was expected. The
    message names the file, the problem and the fix."""


class NoSpaceError(OSError):
    """An output did not fit: the disk is full (ENOSPC), the user's quota is used up (EDQUOT), or the file would pass
    the process's file-size limit (EFBIG, `ulimit -f`). The message names the file, the reason, what it needed and
    that nothing earlier was changed. Nothing of the output is left behind."""

    def __init__(self, message: str, code: int = errno.ENOSPC):
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


def error_summary(err: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message (empty for an empty message), cut at `limit` characters."""
    return (str(err).strip().splitlines() or [""])[0][:limit]
