"""Loading the real offline copies, and the one-line errors for bad data."""
import gzip
import json
from pathlib import Path

import pytest

from cli.json_records import write_json
from data.files import DataError
from data.commonsense import DATASETS, data_source, load_examples, load_rows

# rows per split, from the table in data/datasets/SOURCES.md
ROWS = {"arc_easy": {"train": 2251, "validation": 570, "test": 2376},
        "arc_challenge": {"train": 1119, "validation": 299, "test": 1172},
        "openbookqa": {"train": 4957, "validation": 500, "test": 500}, "piqa": {"train": 16113, "validation": 1838},
        "siqa": {"train": 33410, "validation": 1954}, "winogrande": {"train": 40398, "validation": 1267},
        "boolq": {"train": 9427, "validation": 3270}, "hellaswag": {"train": 3368, "validation": 10042}}


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("style", ["paper", "harness"])
def test_every_dataset_loads_from_the_bundled_copy(name, style, bundled_data):
    examples = load_examples(name, None, style, bundled_data, limit=50)
    assert len(examples) == 50
    for ex in examples:
        assert 2 <= len(ex.continuations) <= 5 and 0 <= ex.gold < len(ex.continuations)
        assert len(ex.prompts) == len(ex.continuations) and all(ex.prompts) and all(ex.continuations)


def test_whole_arc_test_split_quirks(bundled_data):
    examples = load_examples("arc_challenge", None, "paper", bundled_data)
    assert len(examples) == 1172
    assert {len(ex.continuations) for ex in examples} >= {3, 4, 5}


@pytest.mark.parametrize("name", DATASETS)
def test_bundled_copy_is_whole(name, bundled_data):
    splits = sorted(p.name.split(".")[0] for p in (Path(bundled_data) / name).iterdir())
    assert splits == sorted(ROWS[name])
    assert {split: len(load_rows(name, split, bundled_data)) for split in splits} == ROWS[name]


def test_partial_copies_are_announced_once_and_recorded(bundled_data, capsys, monkeypatch):
    monkeypatch.setattr("data.commonsense._warned", set())  # as in a fresh process
    load_examples("hellaswag", None, "paper", bundled_data, limit=3)
    load_examples("hellaswag", None, "harness", bundled_data, limit=3)
    assert capsys.readouterr().err.count("HellaSwag validation split is lossy") == 1
    assert "lossy" in data_source("hellaswag", "validation", bundled_data)["caveat"]
    assert "empty passages" in data_source("boolq", "train", bundled_data)["caveat"]
    assert data_source("arc_easy", "test", bundled_data) == {"source": "bundled", "caveat": None}
    assert data_source("hellaswag", "validation", "/my/copy") == {"source": "/my/copy", "caveat": None}


def test_gzip_and_unsupported_formats(tmp_path):
    (tmp_path / "piqa").mkdir()
    with gzip.open(tmp_path / "piqa" / "validation.jsonl.gz", "wt") as f:
        f.write(json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 1}) + "\n")
    assert load_examples("piqa", data_dir=str(tmp_path))[0].gold == 1
    (tmp_path / "piqa" / "test.csv").write_text("goal,sol1,sol2,label\n")
    with pytest.raises(DataError, match="test.csv is not a supported format; convert it to one of .jsonl"):
        load_examples("piqa", "test", data_dir=str(tmp_path))


def _write(tmp_path, name, split, rows):
    (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'bolq'"):
        load_examples("bolq", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="no folder"):
        load_examples("piqa", data_dir=str(tmp_path))
    _write(tmp_path, "piqa", "train", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}])
    with pytest.raises(DataError, match="available splits: train"):
        load_examples("piqa", data_dir=str(tmp_path))
    _write(tmp_path, "piqa", "validation", [{"goal": "g", "sol1": "a", "label": 0}])
    with pytest.raises(DataError, match="row 0 is malformed.*sol2"):
        load_examples("piqa", data_dir=str(tmp_path))
    _write(tmp_path, "piqa", "validation", [])
    with pytest.raises(DataError, match="validation in .* has no rows"):
        load_examples("piqa", data_dir=str(tmp_path))
    _write(tmp_path, "piqa", "validation", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 7}])
    with pytest.raises(DataError, match="out of range"):
        load_examples("piqa", data_dir=str(tmp_path))


def test_write_json_is_whole_and_readable(tmp_path):
    path = tmp_path / "out" / "heads.json"
    write_json(str(path), {"a": [1, 2]})
    write_json(str(path), {"a": [3]})  # replaces the previous file
    assert json.loads(path.read_text()) == {"a": [3]}
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["heads.json"]  # no temporary file left behind
    with pytest.raises(TypeError):
        write_json(str(path), {"a": object()})  # not serialisable: the old file stays, no temporary file
    assert json.loads(path.read_text()) == {"a": [3]}
    assert [p.name for p in path.parent.iterdir()] == ["heads.json"]
