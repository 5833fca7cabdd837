"""The GPU scripts' CPU dry runs (Triton's interpreter, tiny shapes), so the one-command GPU checks cannot rot."""
import json
import subprocess

import pytest

from tests.conftest import ROOT, run
from tests.test_library import clean_env


def test_the_one_gpu_script_dry_run_checks_the_kernel_and_writes_every_claim(tmp_path):
    """bench/gpu.sh --dry-run: the kernel's checks (bench/gpu.py) pass and write their table, and every claim key of
    bench/results/gpu.json is computed from the same scripts a GPU runs (tiny shapes, the Triton interpreter)."""
    raw, claims = tmp_path / "raw", tmp_path / "gpu.json"
    result = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                            timeout=900, env=clean_env(RAW=str(raw), CLAIMS=str(claims)))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((raw / "kernel.json").read_text())
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
    check_scale_sections(json.loads((raw / "scale.json").read_text()), ("locate_7b_arc", "finetune_7b"))
    got = json.loads(claims.read_text())
    for key in ("kernel_vs_best_unmasked", "kernel_vs_best_masked", "headmap_tokens_per_s", "lora_tokens_per_s",
                "peft_trainer_tokens_per_s", "headmap_checkpointed_tokens_per_s", "lora_checkpointed_tokens_per_s",
                "headmap_offloaded_tokens_per_s",
                "locate_mfu", "locate_seconds", "profiled_headmap_step_over_lora",
                "evaluate_vs_lm_eval_hf",
                "protocol_gpu_hours"):
        assert isinstance(got[key], float) and got[key] > 0, (key, got)
    assert {(g["masked"], g["kv_heads"]) for g in got["kernel_grid"]} == {(f, kv) for kv in (4, 2)
                                                                          for f in (0.0, 0.25, 0.5, 0.75)}
    assert got["evaluate_scores_identical"] is True
    # --fsdp's path: two CPU processes stand in for the machine's GPUs, each holding half the weights
    assert got["fsdp_world"] == 2 and got["fsdp_step_tokens_per_s"] > 0 and got["fsdp_locate_seconds"] > 0
    assert all(b <= 0.55 * got["fsdp_sharding"]["full_parameter_bytes"]
               for b in got["fsdp_sharding"]["local_parameter_bytes"])
    # the ratios are the grid's lowest: recomputed here from the raw rows (no cuDNN on a CPU)
    assert got["kernel_vs_best_unmasked"] == min(r["flash_ms"] / r["kernel_ms"] for r in rows if r["masked"] == 0)
    assert got["kernel_vs_best_masked"] == min(min(r["flash_ms"], r["flex_ms"]) / r["kernel_ms"] for r in rows)
    assert got["kernel_checks_failed"] == []


def check_scale_sections(data: dict, names: tuple[str, ...]) -> None:
    """bench/gpu_scale.py's sections in its JSON: every locate ran every layer, every training path ran."""
    for name in names:
        assert "error" not in data[name], f"{name}: {data[name]}"
        if name.startswith("locate"):
            assert data[name]["layers_run"] == data[name]["layers"] and data[name]["tflops"] > 0
            assert len(data[name]["circuit"]) == data[name]["layers"]
    if "finetune_7b" in names:
        assert [(r["path"], r["method"]) for r in data["finetune_7b"]] == [
            ("ours", "headmap-mha"), ("ours, checkpointed", "headmap-mha"),
            ("ours, checkpointed, chunked, offloaded", "headmap-mha"), ("ours", "lora"),
            ("ours, checkpointed", "lora"), ("ours", "dora"), ("trainer, same batches", "lora"),
            ("trainer, same batches", "dora"), ("trainer, by length", "lora"), ("trainer, by length", "dora")]
        assert all(r["tokens_per_s"] > 0 for r in data["finetune_7b"])
        losses = {(r["path"], r["method"]): r["loss"] for r in data["finetune_7b"]}
        for method in ("headmap-mha", "lora"):  # the checkpointed step is the same step
            assert losses[("ours, checkpointed", method)] == losses[("ours", method)], method
        assert losses[("ours, checkpointed, chunked, offloaded", "headmap-mha")] == pytest.approx(
            losses[("ours", "headmap-mha")], rel=1e-5)  # the loss in slices: the same to rounding


def test_scale_check_dry_run_runs_every_section(tmp_path):
    """The sections bench/gpu.sh does not run (it runs locate_7b_arc and finetune_7b, checked above)."""
    out = tmp_path / "scale.json"
    others = ("naive_7b_arc", "bf16_vs_fp32", "locate_7b_boolq", "locate_8b_arc")
    result = run("bench/gpu_scale.py", "--dry-run", "--sections", ",".join(others), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    check_scale_sections(data, others)
    assert data["naive_7b_arc"]["projected_seconds"] > 0
    assert data["bf16_vs_fp32"]["circuit_heads"] == 2


def test_a_missing_reference_is_one_line_before_the_dry_run_starts():
    import sys
    done = subprocess.run([sys.executable, "bench/needs.py", "peft", "no_such_package_here"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip() == ("error: no_such_package_here not installed: pip install "
                                                            "-r requirements-test.txt")
    assert "bench/needs.py peft lm_eval accelerate" in (ROOT / "bench" / "gpu.sh").read_text()
