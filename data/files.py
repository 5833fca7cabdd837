"""DataError, and read_checked: the one way the project reads a file it is handed."""
from headmap.files import first_line


class DataError(ValueError):
    """A task, a data file or a row the user named is wrong: one line saying what, and how to fix it. The scripts
    print it as their usage errors (exit code 2)."""


def read_checked(path: str, what: str, load, fix: str):
    """`load(path)`, or a DataError naming the file, what is wrong with it (missing, truncated, corrupt, not UTF-8,
    not the expected content ...) and `fix`."""
    try:
        return load(path)
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist; {fix}") from None
    except Exception as err:  # any parser's complaint about the file's content: the file is the problem
        detail = first_line(err, 200)
        raise DataError(f"{what} {path} cannot be read ({type(err).__name__}: {detail}); {fix}") from None
