"""A task of the user's own rows: one file, or a folder of train/validation/test files.

Two schemas, one per file (the first row decides):
    multiple choice  {"prompt": str, "choices": [str, ...], "answer": int}   choice i scored after prompt + delimiter
    one target       {"prompt": str, "target": str}                          target scored after prompt + delimiter
Formats: .jsonl, .jsonl.gz, .json (an array, or one object per line), .csv (a header row; `choices` as a JSON
list) and .parquet (needs pyarrow). The reader is data/files.py's `read_records`, not `datasets.load_dataset`:
it streams, so `--limit` and `--pool` read only the rows they use; a bad row is named by its number and field;
and nothing is copied into a cache. A row that breaks the schema stops the run with one line naming the file, the
row and the field, before any model loads.
"""
import hashlib
import json
from pathlib import Path

from data.common import CHOICE, TARGET, Example, Task, standard_splits
from data.files import FILE_FORMATS, DataError, read_records

SPLITS = ("train", "validation", "test")
WHOLE_FILE = "all"  # the one split of a single file
SCHEMA = ('{"prompt": str, "choices": [str, ...], "answer": int} (multiple choice) or {"prompt": str, "target": str} '
          "(one target)")


class RowError(ValueError):
    """What is wrong with one row: the scripts print it with the file and the row number."""


class FileTask(Task):
    def __init__(self, path: str, delimiter: str = " "):
        self.name, self.delimiter, root = path, delimiter, Path(path)
        if root.is_dir():
            self.files = {split: file for split in SPLITS for file in (root / f"{split}{ext}" for ext in FILE_FORMATS)
                          if file.is_file()}
            if not self.files:
                raise DataError(f"folder {path} holds no train, validation or test file ({', '.join(FILE_FORMATS)}); "
                                "put your rows there, or pass one file")
            self.splits = tuple(self.files)
            self.train_split, self.eval_split = standard_splits(self.splits)
        elif root.is_file():
            if not path.endswith(FILE_FORMATS):
                raise DataError(f"{path} is not a supported format; use one of {', '.join(FILE_FORMATS)}")
            self.files = {WHOLE_FILE: root}
            self.splits, self.train_split, self.eval_split = (WHOLE_FILE,), WHOLE_FILE, WHOLE_FILE
        else:
            raise DataError(f"--dataset {path}: no such file or folder")
        self.kind = self._kind()

    def check_split(self, split: str | None) -> str:
        if split not in (None, WHOLE_FILE) and self.splits == (WHOLE_FILE,):
            raise DataError(f"--split {split}: {self.name} is one file, which has no splits; drop --split, or pass a "
                            "folder of train/validation/test files")
        return super().check_split(split)

    def _kind(self) -> str:
        """CHOICE or TARGET, from the first row of the training file."""
        file = self.files[self.train_split]
        rows = self._read(file, 1)
        if not rows:
            raise DataError(f"{file} has no rows; add some in the schema {SCHEMA}")
        row = rows[0][1]
        if isinstance(row, dict) and "choices" in row:
            return CHOICE
        if isinstance(row, dict) and "target" in row:
            return TARGET
        raise DataError(f"{file} row 1 has neither a 'choices' nor a 'target' field; use the schema {SCHEMA}")

    def _read(self, file: Path, limit: int | None) -> list[tuple[int, dict]]:
        try:
            return list(read_records(file, limit))
        except (ValueError, OSError) as err:  # a row that is not UTF-8 or not JSON, a truncated gzip or Parquet
            raise DataError(f"{file}: {err}") from None

    def examples(self, split: str | None = None, limit: int | None = None) -> list[Example]:
        file = self.files[self.check_split(split)]
        examples = []
        for number, row in self._read(file, limit):
            try:
                examples.append(self.example(row))
            except RowError as err:
                raise DataError(f"{file} row {number}: {err}") from None
        if not examples:
            raise DataError(f"{file} has no rows; add some in the schema {SCHEMA}")
        return examples

    def example(self, row) -> Example:
        if not isinstance(row, dict):
            raise RowError(f"is a {type(row).__name__}, not an object with the fields {SCHEMA}")
        prompt = text_field(row, "prompt")
        if self.kind == TARGET:
            return Example.with_choices(prompt, [text_field(row, "target")], 0, self.delimiter)
        choices = row.get("choices")
        if isinstance(choices, str) and choices.lstrip().startswith("["):  # a CSV cell holds the list as JSON
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError:
                raise RowError("field 'choices' is not a JSON list of strings") from None
        if choices is None:
            raise RowError("has no field 'choices' (the file's first row is multiple choice)")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise RowError("field 'choices' is not a list of strings")
        if len(choices) < 2:
            raise RowError(f"field 'choices' has {len(choices)} choice{'s' * (len(choices) != 1)}; a multiple-choice "
                           "row needs at least two (one answer: use the one-target schema, {\"prompt\", \"target\"})")
        if any(not c.strip() for c in choices):
            raise RowError("field 'choices' holds an empty choice")
        if len(set(choices)) < len(choices):
            twice = next(c for c in choices if choices.count(c) > 1)
            raise RowError(f"field 'choices' names {twice!r} twice; choices must differ")
        answer = row.get("answer")
        if isinstance(answer, str) and answer.strip().isdigit():  # CSV cells are text
            answer = int(answer)
        if answer is None:
            raise RowError("has no field 'answer' (the index of the right choice, from 0)")
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise RowError(f"field 'answer' is {answer!r}, not the index of the right choice (an integer from 0)")
        if not 0 <= answer < len(choices):
            raise RowError(f"field 'answer' is {answer}, out of range for {len(choices)} choices (0..{len(choices) - 1})")
        return Example.with_choices(prompt, choices, answer, self.delimiter)

    def source(self, split: str) -> dict:
        file = self.files[split]
        return {"source": "file", "path": str(file), "rows": count_rows(file), "sha256": sha256(file)}


def text_field(row: dict, field: str) -> str:
    value = row.get(field)
    if value is None:
        raise RowError(f"has no field {field!r}")
    if not isinstance(value, str):
        raise RowError(f"field {field!r} is a {type(value).__name__}, not text")
    if not value.strip():
        raise RowError(f"field {field!r} is empty")
    return value


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def count_rows(file: Path) -> int:
    """All rows of the file (not only those a --limit read): from Parquet's metadata, else one streamed pass."""
    if file.name.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.ParquetFile(file).metadata.num_rows
    if file.name.endswith((".jsonl", ".jsonl.gz")):  # one record per non-blank line: count lines, parse nothing
        import gzip
        with (gzip.open if file.name.endswith(".gz") else open)(file, "rb") as f:
            return sum(1 for line in f if line.strip())
    return sum(1 for _ in read_records(file))
