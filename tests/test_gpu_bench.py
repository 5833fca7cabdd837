"""bench/gpu.py's CPU dry run (Triton's interpreter, tiny shapes), so the one-command GPU check cannot rot."""
import json

from tests.test_cli import run


def test_gpu_check_dry_run_passes_and_writes_its_table(tmp_path):
    out = tmp_path / "gpu.json"
    result = run("bench/gpu.py", "--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert data["failures"] == [] and "all checks passed" in result.stdout
    assert len(data["kernel"]) == 3 * 2 * 2 and all(case["ok"] and case["masked_zero"] for case in data["kernel"])
    assert {(t["kv_heads"], t["masked"]) for t in data["throughput"]} == {(kv, f) for kv in (4, 1)
                                                                           for f in (0.0, 0.25, 0.5)}
    assert data["locate"]["circuits_identical"] and data["locate"]["max_loss_gap"] < 1e-3
    assert [t["method"] for t in data["training"]] == ["headmap-mha", "headmap-hs", "lora", "dora"]
