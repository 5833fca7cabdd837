"""Outputs as a researcher shares them: finetune's --out holds at its top what an upload needs and keeps the
resumable state apart (a run written in the old layout still resumes); before.json holds the run's method's
settings only; locate's last line gives each phase's time; near misses of the eight dataset names get a "did you
mean"; a missing circuit file is worded one way for --heads and --mask."""
import json
import os
import re

import pytest
import torch

from tests.conftest import ROOT, assert_usage_error, run

UPLOAD = ["README.md", "adapter_config.json", "adapter_model.safetensors", "curves.svg", "log.jsonl", "resume",
          "training.json"]


def lora_args(tiny_run, out, *extra):
    return ["finetune.py", "--model", str(tiny_run / "model"), "--method", "lora", "--dataset", "arc_easy",
            "--train-limit", "24", "--batch-size", "4", "--max-steps", "6", "--eval-every", "3", "--val-limit", "4",
            "--eval-limit", "4", "--checkpoint-every", "4", "--warmup", "0", "--no-progress", "--out", str(out),
            *extra]


def test_a_run_in_the_old_layout_resumes_and_its_folder_becomes_shareable(tiny_run, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "run"
    assert run(*lora_args(tiny_run, out)).returncode == 0
    assert sorted(os.listdir(out)) == UPLOAD and sorted(os.listdir(out / "resume")) == ["before.json", "checkpoint.pt"]
    settings = json.loads((out / "resume" / "before.json").read_text())["settings"]
    assert {"rank", "alpha", "dropout"} <= set(settings) and not {"variant", "scaling", "circuit"} & set(settings)
    assert "versions" in json.loads((out / "training.json").read_text())
    finished = load_file(out / "adapter_model.safetensors")
    # laid out as a run written before the resume/ folder: its state at the top of --out
    for name in ("checkpoint.pt", "before.json"):
        os.replace(out / "resume" / name, out / name)
    os.rmdir(out / "resume")
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step == 6  # the last checkpoint is the last validation's
    resumed = run(*lora_args(tiny_run, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {step}" in resumed.stdout  # its checkpoint found where the old layout kept it
    assert sorted(os.listdir(out)) == UPLOAD and sorted(os.listdir(out / "resume")) == ["before.json", "checkpoint.pt"]
    got = load_file(out / "adapter_model.safetensors")
    assert finished.keys() == got.keys() and all(torch.equal(finished[k], got[k]) for k in finished)


def test_locates_last_line_gives_the_search_the_validation_and_the_whole(tiny_run, tmp_path):
    done = run("locate.py", "--dataset", "arc_easy", "--model", str(tiny_run / "model"), "--pool", "8", "--samples",
               "2", "--validate-limit", "8", "--random-trials", "1", "--no-progress", "--out", str(tmp_path / "h.json"))
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    found = re.match(r"located \d+ heads \(search ([\d.]+) s, validation ([\d.]+) s; ([\d.]+) s in all for this "
                     r"command, loading the model and choosing the samples included\); wrote ", last)
    assert found, last
    search, validation, whole = map(float, found.groups())
    assert search + validation <= whole
    assert json.loads((tmp_path / "h.json").read_text())["validation_seconds"] == validation


@pytest.mark.parametrize("typed", ["arc-easy", "ARC_Easy", "Arc Easy", "arc_eazy"])
def test_a_near_miss_of_a_dataset_name_gets_did_you_mean(typed):
    assert_usage_error(run("evaluate.py", "--dataset", typed), f"unknown dataset {typed!r} (did you mean arc_easy?)")


def test_a_missing_circuit_file_is_worded_one_way(tmp_path):
    missing = str(tmp_path / "nope.json")
    heads = run("finetune.py", "--heads", missing, "--out", str(tmp_path / "run"))
    mask = run("evaluate.py", "--dataset", "arc_easy", "--mask", missing)
    assert_usage_error(heads, f"circuit file {missing} does not exist; pass a heads.json written by locate.py")
    assert heads.stderr.strip().splitlines()[-1] == mask.stderr.strip().splitlines()[-1]


def test_the_bundled_finetuning_records_draw_their_step_0(tmp_path):
    from cli import figures
    records = [log.with_name(log.name.replace(".log.jsonl", ".json")) for log in (ROOT / "experiments").rglob(
        "*.log.jsonl")]
    records = [r for r in records if r.exists()]  # a record with its log beside it, as plot.py curves reads them
    assert len(records) >= 30
    for record in records:
        name, _, val = figures.read_run(str(record))
        assert val[0][0] == 0, name  # the base model's validation loss, at step 0
