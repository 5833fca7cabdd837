"""How a script ends: bad input as one line and exit code 2, never a traceback; Ctrl-C and SIGTERM with the command
that continues the run."""
import os
import signal
import sys
from contextlib import contextmanager

from data.files import DataError
from headmap.errors import NoSpaceError, UnreadableFile, UnsupportedModel, error_summary


class UsageError(ValueError):
    """Bad input from the user: the scripts print it as one line and exit with code 2."""


# what a script refuses in one line, exit code 2: the user's input, a model the library cannot serve, a full disk
REFUSALS = (UsageError, DataError, UnreadableFile, UnsupportedModel, NoSpaceError)


class Terminated(KeyboardInterrupt):
    """SIGTERM, what SLURM and Kubernetes send before they kill a job: stopped as Ctrl-C stops a run."""


def _terminate(signum, frame):
    raise Terminated


def run_script(main, resumable: bool = False) -> None:
    """Run a script's main(), turning every way it can stop into one line on stderr, never a traceback.

    Bad input, an unsupported model or a full disk: 'error: ...', exit code 2. A loss that is not finite: 'error:
    ...', exit code 1. Ctrl-C (exit code 130) and SIGTERM (143): the command that continues the run, for a resumable
    script (its last checkpoint is whole: every file is written atomically)."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except REFUSALS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:  # training diverged: not bad input (the message says what is kept)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as stop:
        argv = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
        hint = f"; continue with: python {os.path.basename(sys.argv[0])} {' '.join(argv)}" if resumable else ""
        terminated = isinstance(stop, Terminated)
        print(f"\n{'terminated (SIGTERM)' if terminated else 'interrupted'}{hint}", file=sys.stderr)
        sys.exit(143 if terminated else 130)


@contextmanager
def refused(what: str, fix: str | None = None):
    """A library ValueError about what the user handed over (a circuit that does not fit the model, an adapter of
    another base model) as one usage line: '<what>: <the library's reason>[; <fix>]'."""
    try:
        yield
    except ValueError as err:
        if isinstance(err, REFUSALS):
            raise
        raise UsageError(f"{what}: {error_summary(err)}" + (f"; {fix}" if fix else "")) from None
