"""Nothing a user made is lost, nothing half-read is used: merge.py's --out, finetune.py's --out, corrupt input
files, bad numbers and a --resume with other settings are each one line and exit 2, before any model loads."""
import gzip
import json
import os
import stat

import pytest
import torch

from headmap.files import current_umask
from tests.conftest import assert_usage_error, run


def test_merge_never_writes_over_the_adapter_its_parent_the_current_or_home_folder(tiny_run, tmp_path):
    adapter = tiny_run / "runs" / "adapter"
    (tiny_run / "runs" / "notes.txt").write_text("mine")
    for out, what in [(tiny_run / "runs", "the adapter folder"), (adapter, "the adapter folder"),
                      (".", "the current folder"), (os.path.expanduser("~"), "your home folder"), ("/", "the adapter")]:
        assert_usage_error(run("merge.py", "--adapter", str(adapter), "--out", str(out), "--overwrite"), what)
    assert (tiny_run / "runs" / "notes.txt").read_text() == "mine" and (adapter / "adapter_config.json").exists()


def test_merge_keeps_a_folder_it_did_not_write_unless_told(tiny_run, tmp_path):
    adapter = str(tiny_run / "runs" / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_usage_error(run("merge.py", "--adapter", adapter, "--out", str(out)),
                       "holds files merge.py did not write (notes.txt)")
    result = run("merge.py", "--adapter", adapter, "--out", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").exists()


def test_merge_writes_again_over_its_own_checkpoint_with_the_users_umask(tiny_run, tmp_path):
    adapter = str(tiny_run / "runs" / "adapter")
    out = tmp_path / "merged"
    for _ in range(2):  # the second run replaces the first one's checkpoint: no flag needed
        result = run("merge.py", "--adapter", adapter, "--out", str(out))
        assert result.returncode == 0, result.stderr
    marker = json.loads((out / "merge.json").read_text())
    assert sorted(os.listdir(out)) == sorted(marker["files"] + ["merge.json"])
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~current_umask()  # not mkdtemp's 0700
    assert stat.S_IMODE((out / "merge.json").stat().st_mode) == 0o666 & ~current_umask()


@pytest.mark.parametrize("cut", [slice(None, 40), slice(None, -8)], ids=["in the header", "at the end"])
def test_a_truncated_adapter_is_refused_before_the_model_loads(tiny_run, tmp_path, cut):
    broken = tmp_path / "adapter"
    broken.mkdir()
    source = tiny_run / "runs" / "adapter"
    (broken / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes()[cut])
    for script, extra in [("evaluate.py", ["--dataset", "boolq", "--limit", "2"]),
                          ("merge.py", ["--out", str(tmp_path / "merged")])]:
        assert_usage_error(run(script, "--adapter", str(broken), *extra), "adapter weights")


def test_an_existing_out_file_is_kept_unless_overwrite(tiny_run, tmp_path):
    """evaluate, locate (its circuit and the heat map beside it) and plot refuse to replace a file before any model
    loads; --overwrite replaces it."""
    mine = tmp_path / "mine.json"
    mine.write_text("my notes")
    heads = tmp_path / "heads.json"
    (tmp_path / "heads.svg").write_text("my figure")
    model = ["--model", str(tiny_run / "model")]
    for args, taken in [(["evaluate.py", "--dataset", "arc_easy", *model, "--out", str(mine)], mine),
                        (["locate.py", "--dataset", "arc_easy", *model, "--out", str(mine)], mine),
                        (["locate.py", "--dataset", "arc_easy", *model, "--out", str(heads)], tmp_path / "heads.svg"),
                        (["plot.py", "curves", str(tmp_path), "--out", str(tmp_path / "heads.svg")],
                         tmp_path / "heads.svg")]:
        assert_usage_error(run(*args), f"{taken} exists; pass --overwrite to replace it, or another --out")
    assert mine.read_text() == "my notes" and (tmp_path / "heads.svg").read_text() == "my figure"
    done = run("evaluate.py", "--dataset", "arc_easy", *model, "--limit", "2", "--out", str(mine), "--overwrite")
    assert done.returncode == 0, done.stderr
    assert json.loads(mine.read_text())["results"]["arc_easy"]["n"] == 2


def test_a_data_row_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "boolq").mkdir()
    with gzip.open(tmp_path / "boolq" / "validation.jsonl.gz", "wb") as f:
        f.write(b'{"question": "is it \xff?", "passage": "p", "answer": true}\n')
    assert_usage_error(run("evaluate.py", "--dataset", "boolq", "--data-dir", str(tmp_path)),
                       "data file")


def test_locate_refuses_a_corrupt_progress_file(tiny_run, tmp_path):
    out = tmp_path / "heads.json"
    (tmp_path / "heads.json.progress.json").write_text('{"settings": {"mod')
    assert_usage_error(run("locate.py", "--dataset", "arc_easy", "--model", str(tiny_run / "model"), "--out", str(out),
                           "--resume", "--pool", "4", "--samples", "2"), "progress file")


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_finetune_refuses_a_learning_rate_that_is_not_a_positive_number(value, tmp_path):
    assert_usage_error(run("finetune.py", "--method", "lora", "--dataset", "boolq", "--lr", value, "--out",
                           str(tmp_path / "run")), "--lr must be a finite number above 0")


@pytest.mark.parametrize("args,message", [(["--dropout", "1"], "--dropout must be in [0, 1)"),
                                          (["--alpha", "nan"], "--alpha must be a finite number"),
                                          (["--resume", "--overwrite"], "pass one of them")])
def test_finetune_refuses_other_bad_numbers(args, message, tmp_path):
    assert_usage_error(run("finetune.py", "--method", "lora", "--dataset", "boolq", *args, "--out",
                           str(tmp_path / "run")), message)


def test_finetune_out_resume_and_overwrite(tiny_run, tmp_path):
    out = tmp_path / "run"
    args = ["finetune.py", "--model", str(tiny_run / "model"), "--method", "lora", "--dataset", "arc_easy",
            "--train-limit", "16", "--batch-size", "4", "--max-steps", "2", "--eval-every", "1", "--val-limit", "4",
            "--eval-limit", "4", "--checkpoint-every", "1", "--warmup", "0", "--no-progress", "--out", str(out)]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    assert_usage_error(run(*args), "holds files already (a run?); pass --resume to continue that run, --overwrite")
    # --resume with a setting that changes the result is another run: refused by name, before the model loads
    assert_usage_error(run(*args[:-2], "--eval-limit", "8", "--out", str(out), "--resume"), "eval_limit is 8 here but 4")
    (out / "resume" / "checkpoint.pt").write_bytes((out / "resume" / "checkpoint.pt").read_bytes()[:100])
    assert_usage_error(run(*args, "--resume"), "checkpoint")
    again = run(*args, "--overwrite")
    assert again.returncode == 0, again.stderr


# ---------------------------------------------------------------- killed at random points, then resumed

def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}


def _kill_and_resume(cmd, check_outputs, mid_run, seed):
    """Run `cmd` three times: SIGKILLed as soon as `mid_run()` holds (a progress file or checkpoint exists), then
    with --resume SIGKILLed at a random moment within the uninterrupted run's time, then with --resume to the end;
    after each kill no output may be half-written. Returns whether the first kill landed mid-run."""
    import random
    import subprocess
    import time

    from tests.conftest import ROOT
    rng = random.Random(seed)
    landed_mid_run = False
    for attempt in ("at the first checkpoint", "at random", "to the end"):
        proc = subprocess.Popen(cmd + ([] if attempt.startswith("at the first") else ["--resume"]), cwd=ROOT,
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if attempt == "to the end":
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            return landed_mid_run
        if attempt == "at random":
            deadline = time.time() + rng.uniform(*cmd_window[cmd[1]])
        while proc.poll() is None and (time.time() < deadline if attempt == "at random" else not mid_run()):
            time.sleep(0.02)
        landed_mid_run |= attempt.startswith("at the first") and proc.poll() is None
        proc.kill()
        proc.communicate()
        check_outputs()


cmd_window = {}  # script -> (earliest, latest) kill time in seconds, from its uninterrupted run


def _timed(cmd):
    import subprocess
    import time

    from tests.conftest import ROOT
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    elapsed = time.time() - start
    cmd_window[cmd[1]] = (0.35 * elapsed, 0.95 * elapsed)
    return elapsed


def _whole_json_or_absent(*paths):
    for path in paths:
        if path.exists():
            json.loads(path.read_text())  # a half-written file would not parse


def test_locate_killed_anywhere_resumes_to_the_same_circuit(tiny_run, tmp_path):
    import sys
    base = [sys.executable, "locate.py", "--dataset", "arc_easy", "--prompt", "harness", "--model",
            str(tiny_run / "model"), "--pool", "12", "--samples", "4", "--heads-per-layer", "1", "--no-validate",
            "--no-progress"]
    _timed(base + ["--out", str(tmp_path / "ref.json")])
    out = tmp_path / "cut.json"
    progress = tmp_path / "cut.json.progress.json"
    assert _kill_and_resume(base + ["--out", str(out)], lambda: _whole_json_or_absent(out, progress),
                            progress.exists, seed=1)
    ref, got = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ref", "cut"))
    for key in ("knowledge_circuit", "loss_matrix", "sample_indices", "unmasked_loss"):
        assert got[key] == ref[key], key
    assert not (tmp_path / "cut.json.progress.json").exists()


def test_locate_resumes_with_the_samples_it_chose_without_scoring_the_pool_again(tiny_run, tmp_path, monkeypatch):
    import locate
    base = ["--dataset", "arc_easy", "--prompt", "harness", "--model", str(tiny_run / "model"), "--pool", "12",
            "--samples", "4", "--heads-per-layer", "1", "--no-validate", "--no-progress"]
    ref = locate.main(base + ["--out", str(tmp_path / "ref.json")])
    import headmap.locate
    import data.samples
    search = headmap.locate.locate_circuit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(headmap.locate, "locate_circuit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        locate.main(base + ["--out", str(tmp_path / "cut.json")])
    saved = json.loads((tmp_path / "cut.json.progress.json").read_text())
    assert saved["sample_indices"] == ref["sample_indices"] and saved["loss_matrix"] == []

    def never(*args, **kwargs):
        raise AssertionError("the pool was scored again")

    monkeypatch.setattr(headmap.locate, "locate_circuit", search)
    monkeypatch.setattr(data.samples, "select_samples", never)
    got = locate.main(base + ["--out", str(tmp_path / "cut.json"), "--resume"])
    assert got["knowledge_circuit"] == ref["knowledge_circuit"] and got["loss_matrix"] == ref["loss_matrix"]


def test_finetune_killed_anywhere_resumes_to_the_same_adapter(tiny_run, tmp_path):
    import sys

    from safetensors.torch import load_file
    base = [sys.executable, "finetune.py", "--model", str(tiny_run / "model"), "--method", "lora", "--dataset",
            "arc_easy", "--train-limit", "24", "--batch-size", "4", "--max-steps", "6", "--eval-every", "3",
            "--val-limit", "4", "--eval-limit", "4", "--checkpoint-every", "1", "--warmup", "0", "--no-progress"]
    _timed(base + ["--out", str(tmp_path / "ref")])
    out = tmp_path / "cut"

    def whole():
        _whole_json_or_absent(out / "resume" / "before.json", out / "adapter_config.json", out / "training.json")
        if (out / "resume" / "checkpoint.pt").exists():
            torch.load(out / "resume" / "checkpoint.pt", weights_only=True)
        if (out / "adapter_model.safetensors").exists():
            load_file(out / "adapter_model.safetensors")
    assert _kill_and_resume(base + ["--out", str(out)], whole, (out / "resume" / "checkpoint.pt").exists, seed=2)
    ref, got = load_file(tmp_path / "ref" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)  # bit for bit
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_merge_killed_while_writing_leaves_a_whole_checkpoint(tiny_run, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file
    from tests.conftest import ROOT
    out = tmp_path / "merged"
    cmd = [sys.executable, "merge.py", "--adapter", str(tiny_run / "runs" / "adapter"), "--out", str(out)]
    elapsed = _timed(cmd)
    import random
    rng = random.Random(3)
    for _ in range(2):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.5 * elapsed, elapsed))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        marker = json.loads((out / "merge.json").read_text())  # old or new, always whole
        assert sorted(os.listdir(out)) == sorted(marker["files"] + ["merge.json"])
        load_file(out / "model.safetensors")
