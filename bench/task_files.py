"""How long a user's file of a million rows takes to load: the --limit path (reads only the rows it uses), every
row, and the provenance (row count, sha256), against what a user would otherwise reach for, `datasets.load_dataset`
(its first call, which converts the file into an Arrow cache, and a second, which reads the cache, with its rows
turned into the Python dicts a script would build examples from).

    python bench/task_files.py --rows 1000000
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.tasks import open_task  # noqa: E402
from data.user_files import count_rows, sha256  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--rows", type=int, default=1_000_000)
p.add_argument("--limit", type=int, default=1000)
args = p.parse_args()


def timed(what, run):
    start = time.perf_counter()
    out = run()
    print(f"{what:<58}{time.perf_counter() - start:>8.2f} s", flush=True)
    return out


with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "rows.jsonl"
    with open(path, "w") as f:
        for i in range(args.rows):
            f.write(json.dumps({"prompt": f"Question {i}: which number comes after {i}?",
                                "choices": [str(i + 1), str(i + 2), str(i - 1)], "answer": 0}) + "\n")
    print(f"{args.rows:,} multiple-choice rows, {path.stat().st_size / 2**20:.0f} MiB of JSON Lines")
    task = timed("open the task (reads row 1 for the schema)", lambda: open_task(str(path)))
    timed(f"--limit {args.limit}: {args.limit:,} examples", lambda: task.examples(limit=args.limit))
    examples = timed("every row: checked examples", lambda: task.examples())
    assert len(examples) == args.rows
    timed("provenance: row count", lambda: count_rows(path))
    timed("provenance: sha256", lambda: sha256(path))
    try:
        import datasets
    except ImportError:
        print("datasets is not installed: no comparison with load_dataset")
        sys.exit(0)
    cache = Path(tmp) / "cache"
    load = lambda: datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))  # noqa: E731
    timed("datasets.load_dataset, first call (builds its Arrow cache)", load)
    timed("datasets.load_dataset again, its rows as Python dicts", lambda: list(load()))
