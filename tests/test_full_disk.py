"""A write that does not fit, made as a user meets it: the file-size limit (`ulimit -f`, EFBIG; torch.save reports
it only as "unexpected pos") and a full small disk (ENOSPC). Every script ends in one line naming the file, the
reason and that nothing earlier was changed, exit 2, no traceback, no temporary file left; finetune then resumes
as if nothing had happened. And a folder given where a file is written (or a file where a folder is) is refused
before the model loads, --overwrite or not."""
import json
import os
import resource
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, assert_usage_error, run
from tests.test_bad_inputs import left_on_disk, run_on_a_small_disk


def limited(limit: int, *args, **env_vars):
    """A script run as `ulimit -f` would run it: no file it writes may pass `limit` bytes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env_vars
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))


def temporaries(folder) -> list[str]:
    return [f for _, _, files in os.walk(folder) for f in files if f.startswith(".tmp-")]


def assert_one_line(done, reason: str, path):
    assert_usage_error(done, f"{reason} writing {path}: it needs ")
    assert done.stderr.strip().splitlines()[-1].endswith(("nothing earlier was changed; raise the limit or write it "
                                                          "elsewhere", "nothing earlier was changed; free some space "
                                                          "or write it elsewhere"))


def test_finetune_stopped_by_the_file_size_limit_resumes_as_if_nothing_happened(tiny_run, tmp_path):
    from safetensors.torch import load_file
    args = ["finetune.py", "--model", str(tiny_run / "model"), "--method", "lora", "--dataset", "arc_easy",
            "--train-limit", "24", "--batch-size", "4", "--max-steps", "6", "--eval-every", "4", "--val-limit", "4",
            "--eval-limit", "4", "--checkpoint-every", "2", "--warmup", "0", "--no-progress"]
    ref = tmp_path / "ref"
    assert run(*args, "--out", str(ref)).returncode == 0
    # the checkpoint of step 2 holds the adapter and AdamW's two moments; step 4's (a validation) holds the best
    # adapter too: a limit between the two stops the run at step 4, whose checkpoint.pt is then the step-2 one
    adapter = os.path.getsize(ref / "adapter_model.safetensors")
    limit = os.path.getsize(ref / "resume" / "checkpoint.pt") - adapter // 2
    out = tmp_path / "run"
    done = limited(limit, *args, "--out", str(out))
    assert_one_line(done, "file too large", out / "resume" / "checkpoint.pt")
    assert "unexpected pos" not in done.stderr and temporaries(out) == []
    assert torch.load(out / "resume" / "checkpoint.pt", weights_only=True)["step"] == 2  # the earlier checkpoint, whole
    resumed = run(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 2" in resumed.stdout
    want, got = load_file(ref / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)  # bit for bit

    def log(folder):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (folder / "log.jsonl").read_text().splitlines()]
    assert log(out) == log(ref)  # every step once, with the uninterrupted run's numbers


def test_merge_past_the_file_size_limit_is_one_line_and_leaves_nothing(tiny_run, tmp_path):
    out = tmp_path / "merged"
    done = limited(100_000, "merge.py", "--adapter", str(tiny_run / "runs" / "adapter"), "--out", str(out))
    assert_one_line(done, "file too large", out)
    assert "SafetensorError" not in done.stderr and not out.exists() and temporaries(tmp_path) == []


def test_the_gguf_conversion_past_the_file_size_limit_is_one_line_and_caches_nothing(tmp_path):
    cache = tmp_path / "cache"
    done = limited(50 * 2 ** 20, "evaluate.py", "--dataset", "arc_easy", "--limit", "2", "--no-progress",
                   HEADMAP_CACHE=str(cache))
    assert_usage_error(done, "file too large writing ")
    assert "nothing earlier was changed" in done.stderr
    assert [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("what", ["evaluate", "locate"])
def test_a_full_disk_under_evaluate_and_locate_outputs_is_one_line(tiny_run, tmp_path, what):
    args = {"evaluate": ["evaluate.py", "--dataset", "arc_easy", "--model", str(tiny_run / "model"), "--limit", "40",
                         "--log-samples", "--no-progress", "--out", "DISK/scores.json"],
            "locate": ["locate.py", "--dataset", "arc_easy", "--model", str(tiny_run / "model"), "--pool", "8",
                       "--samples", "2", "--no-validate", "--no-progress", "--out", "DISK/heads.json"]}[what]
    done = run_on_a_small_disk(tmp_path, 64, args, fill_kib=60)
    assert_usage_error(done, "no space left writing ")
    assert "nothing earlier was changed; free some space or write it elsewhere" in done.stderr
    assert left_on_disk(done) == ["mine.bin"]


@pytest.mark.parametrize("script", ["evaluate", "locate", "plot"])
def test_a_folder_given_where_a_file_is_written_is_refused_before_the_model_loads(tiny_run, tmp_path, script):
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "kept.txt").write_text("mine")
    args = {"evaluate": ["evaluate.py", "--dataset", "arc_easy", "--model", str(tiny_run / "model")],
            "locate": ["locate.py", "--dataset", "arc_easy", "--model", str(tiny_run / "model")],
            "plot": ["plot.py", "heatmap", "experiments/circuits/arc_easy.json"]}[script]
    out = str(folder) + "/" if script != "plot" else str(folder)  # as typed, with or without the slash
    if script == "plot":
        os.rename(folder, folder.with_suffix(".png"))
        folder, out = folder.with_suffix(".png"), str(folder.with_suffix(".png"))
    for extra in ([], ["--overwrite"]):
        done = run(*args, "--out", out, *extra)
        assert_usage_error(done, f"--out {out} is a folder, where a file is written; pass a file's path")
    assert (folder / "kept.txt").read_text() == "mine"


def test_locates_heat_map_and_progress_file_standing_as_folders_are_refused(tiny_run, tmp_path):
    args = ["locate.py", "--dataset", "arc_easy", "--model", str(tiny_run / "model"), "--out", str(tmp_path / "h.json")]
    (tmp_path / "h.svg").mkdir()
    assert_usage_error(run(*args, "--overwrite"), f"the heat map of --out {tmp_path / 'h.svg'} is a folder")
    os.rmdir(tmp_path / "h.svg")
    (tmp_path / "h.json.progress.json").mkdir()
    assert_usage_error(run(*args), f"the progress file of --out {tmp_path / 'h.json.progress.json'} is a folder")


def test_a_folder_standing_where_finetune_or_merge_writes_a_file_is_refused(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "training.json").mkdir(parents=True)
    done = run("finetune.py", "--model", str(tiny_run / "model"), "--method", "lora", "--dataset", "arc_easy",
               "--out", str(run_dir), "--overwrite")
    assert_usage_error(done, "holds a folder training.json, where the run writes its file training.json")
    merged = tmp_path / "merged"
    (merged / "config.json").mkdir(parents=True)
    done = run("merge.py", "--adapter", str(tiny_run / "runs" / "adapter"), "--out", str(merged), "--overwrite")
    assert_usage_error(done, "holds a folder config.json, where the checkpoint writes a file of that name")
    plain = tmp_path / "plain"
    plain.write_text("mine")
    for script in (["finetune.py", "--method", "lora", "--dataset", "arc_easy"],
                   ["merge.py", "--adapter", str(tiny_run / "runs" / "adapter")]):
        assert_usage_error(run(*script, "--out", str(plain), "--overwrite"), f"--out {plain} is a file; pass a folder")
    assert plain.read_text() == "mine"


def test_a_log_line_that_does_not_fit_is_taken_back_whole(tmp_path):
    code = ("import sys; sys.path.insert(0, '.')\n"
            "from cli.run_folder import RunLog\n"
            f"log = RunLog({str(tmp_path / 'log.jsonl')!r})\n"
            "for step in range(1, 100):\n"
            "    log.write({'step': step, 'loss': 1 / step})\n")
    done = limited(300, "-c", code)
    assert "NoSpaceError: file too large writing " in done.stderr and "nothing earlier was changed" in done.stderr
    lines = (tmp_path / "log.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) > 3 and all(line.endswith("\n") for line in lines)  # whole lines only, none torn
    assert [json.loads(line)["step"] for line in lines] == list(range(1, len(lines) + 1))
