"""Loading the real offline copies, and the one-line errors for bad data."""
import json

import pytest

from data import DATASETS, load_examples
from data.files import write_json
from kernels.model import UsageError

LOCAL_SPLITS = {"hellaswag": "validation_lossy"}


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("style", ["paper", "harness"])
def test_every_dataset_loads_from_shared_copies(name, style, shared_data):
    examples = load_examples(name, LOCAL_SPLITS.get(name), style, shared_data, limit=50)
    assert len(examples) == 50
    for ex in examples:
        assert 2 <= len(ex.continuations) <= 5 and 0 <= ex.gold < len(ex.continuations)
        assert len(ex.prompts) == len(ex.continuations) and all(ex.prompts) and all(ex.continuations)


def test_whole_arc_test_split_quirks(shared_data):
    examples = load_examples("arc_challenge", None, "paper", shared_data)
    assert len(examples) == 1172
    assert {len(ex.continuations) for ex in examples} >= {3, 4, 5}


def _write(tmp_path, name, split, rows):
    (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(UsageError, match="unknown dataset 'bolq'"):
        load_examples("bolq", data_dir=str(tmp_path))
    with pytest.raises(UsageError, match="no folder"):
        load_examples("piqa", data_dir=str(tmp_path))
    _write(tmp_path, "piqa", "train", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}])
    with pytest.raises(UsageError, match="available splits: train"):
        load_examples("piqa", data_dir=str(tmp_path))
    _write(tmp_path, "piqa", "validation", [{"goal": "g", "sol1": "a", "label": 0}])
    with pytest.raises(UsageError, match="row 0 is malformed.*sol2"):
        load_examples("piqa", data_dir=str(tmp_path))
    _write(tmp_path, "piqa", "validation", [])
    with pytest.raises(UsageError, match="is empty"):
        load_examples("piqa", data_dir=str(tmp_path))
    _write(tmp_path, "piqa", "validation", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 7}])
    with pytest.raises(UsageError, match="out of range"):
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
