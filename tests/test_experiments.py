"""experiments/paper.sh, the paper's whole protocol for one model, end to end on a tiny random model with tiny
limits: every step runs and writes its output, a second run skips them all, --plan lists them."""
import json

from tests.test_cli import run


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
    plan = run("experiments/paper.py", *args, "--plan")
    assert plan.returncode == 0, plan.stderr
    lines = [line for line in plan.stdout.splitlines() if line.startswith("boolq:")]
    assert len(lines) == 5 and all(" yes " in line for line in lines) and "left to run: about 0.0 hours" in plan.stdout
