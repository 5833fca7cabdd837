"""DataError, and read_records: the rows of a JSON Lines, JSON, CSV or Parquet file, streamed. (A file the user hands
over is read through headmap.files.read_input, the one checked reader.)"""
import gzip
import json
from pathlib import Path



class DataError(ValueError):
    """A task, a data file or a row the user named is wrong: one line saying what, and how to fix it. The scripts
    print it as their usage errors (exit code 2)."""


FILE_FORMATS = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")


def read_records(path: Path, limit: int | None = None):
    """(row number from 1, record) of a JSON Lines file (optionally gzip), a JSON array, a CSV file with a header or
    a Parquet file, streamed: with `limit`, only the first `limit` records are read. A row that is not UTF-8 or not
    JSON raises ValueError naming its row number."""
    name = path.name
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        yield from _numbered((record for batch in batches for record in batch.to_pylist()), limit)
        return
    with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
        if name.endswith(".csv"):
            import csv
            import io
            yield from _numbered(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig", newline="")), limit)
        elif name.endswith(".json") and f.read(4096).lstrip()[:1] == b"[":  # one array; else one record per line
            f.seek(0)
            try:
                records = json.loads(f.read())
            except UnicodeDecodeError:
                raise ValueError("the file is not UTF-8 text; re-save it as UTF-8") from None
            yield from _numbered(records, limit)
        else:
            f.seek(0)
            yield from _numbered((json.loads(line.decode()) for line in f if line.strip()), limit)


def _numbered(records, limit: int | None):
    """Number `records` from 1, stop after `limit`, and name the row that fails to decode."""
    records, number = iter(records), 0
    while limit is None or number < limit:
        try:
            record = next(records)
        except StopIteration:
            return
        except UnicodeDecodeError:
            raise ValueError(f"row {number + 1} is not UTF-8 text; re-save the file as UTF-8") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"row {number + 1} is not JSON ({err.msg})") from None
        number += 1
        yield number, record
