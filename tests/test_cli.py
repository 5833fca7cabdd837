"""The scripts as a user runs them: real accuracies, and one-line errors with exit code 2."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args,message", [
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--dataset", "hellaswag"], "available splits: train_partial, validation_lossy"),
    (["--dataset", "boolq", "--limit", "0"], "--limit must be at least 1"),
    (["--dataset", "boolq", "--model", "/no/such/model.gguf"], "does not exist"),
    (["--dataset", "boolq", "--out", "/proc/nope/r.json"], "cannot write /proc/nope/r.json"),
])
def test_evaluate_bad_input_is_one_line_and_exit_2(args, message, shared_data):
    result = run("evaluate.py", "--data-dir", shared_data, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_evaluate_writes_real_accuracy(smollm2, shared_data, tmp_path):
    out = tmp_path / "r.json"
    result = run("evaluate.py", "--dataset", "boolq,arc_easy", "--limit", "20", "--data-dir", shared_data,
                 "--out", str(out), "--log-samples", "--no-progress")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    for name in ("boolq", "arc_easy"):
        r = data["results"][name]
        assert r["n"] == 20 and 0.0 <= r["acc"] <= 1.0 and len(r["samples"]) == 20
        assert r["acc"] == sum(s["pred"] == s["gold"] for s in r["samples"]) / 20
    assert "boolq" in result.stdout and "acc_norm" in result.stdout
