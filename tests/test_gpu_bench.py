"""The GPU scripts' CPU dry runs (Triton's interpreter, tiny shapes), so the one-command GPU checks cannot rot."""
import json

from tests.test_cli import run


def test_kernel_check_dry_run_passes_and_writes_its_table(tmp_path):
    out = tmp_path / "gpu.json"
    result = run("bench/gpu.py", "--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert data["failures"] == [] and "all checks passed" in result.stdout
    cases = [case["case"] for case in data["kernel"]]
    for feature in ("causal, GQA 4:1", "KV cache offset", "right padded", "left padded", "window, left padded",
                    "softcap 30, window", "per-head windows", "mask with holes (dense)"):
        assert any(feature in case for case in cases), feature
    assert {c.split()[0] for c in cases} == {"bfloat16", "float16", "float32"}
    assert all(case["ok"] and case["masked_zero"] for case in data["kernel"])
    rows = data["throughput"]
    assert {(t["kv_heads"], t["masked"]) for t in rows} == {(kv, f) for kv in (4, 2) for f in (0.0, 0.25, 0.5, 0.75)}
    assert all(isinstance(t[k], float) for t in rows for k in ("flash_ms", "flex_ms", "kernel_ms", "sdpa_mask_ms",
                                                                "kernel_padded_ms"))


def test_scale_check_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "scale.json"
    result = run("bench/gpu_scale.py", "--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    for name in ("locate_7b_arc", "locate_7b_boolq", "locate_8b_arc"):
        assert data[name]["layers_run"] == data[name]["layers"] and data[name]["tflops"] > 0
        assert len(data[name]["circuit"]) == data[name]["layers"]
    assert [(r["path"], r["method"]) for r in data["finetune_7b"]] == [
        ("ours", "headmap-mha"), ("ours", "lora"), ("ours", "dora"), ("trainer, same batches", "lora"),
        ("trainer, same batches", "dora"), ("trainer, by length", "lora"), ("trainer, by length", "dora")]
    assert all(r["tokens_per_s"] > 0 for r in data["finetune_7b"])
    assert data["naive_7b_arc"]["projected_seconds"] > 0
    assert data["bf16_vs_fp32"]["circuit_heads"] == 2
