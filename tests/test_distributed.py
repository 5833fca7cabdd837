"""torchrun: two processes (gloo on CPU, one thread each) give what one process gives, for all three scripts;
a run resumes under another process count; one rank's failure stops the run; an explicit device map runs."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TORCHRUN, free_port, launch
from tests.test_finetune import train_tiny_lora

def test_evaluate_under_torchrun_gives_the_same_results(tiny_folder, tmp_path):
    args = ["evaluate.py", "--model", tiny_folder, "--dataset", "arc_easy,winogrande", "--limit", "24",
            "--batch-size", "4", "--log-samples"]
    launch(*args, "--out", str(tmp_path / "one.json"))
    launch(*args, "--out", str(tmp_path / "two.json"), processes=2)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one == two  # every score bit for bit: each prompt batch runs whole on one rank


def test_locate_under_torchrun_gives_the_same_circuit(tiny_folder, tmp_path):
    args = ["locate.py", "--model", tiny_folder, "--dataset", "arc_easy", "--prompt", "harness", "--pool", "60",
            "--samples", "6", "--heads-per-layer", "2", "--batch-size", "5", "--validate-limit", "12",
            "--random-trials", "2"]
    launch(*args, "--out", str(tmp_path / "one.json"))
    launch(*args, "--out", str(tmp_path / "two.json"), processes=2)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert len(one["sample_indices"]) == 6 and one["sample_indices"] == two["sample_indices"]
    assert one["knowledge_circuit"] == two["knowledge_circuit"]
    # two ranks cut the rows into twice as many batches: the same losses, to float summation order
    torch.testing.assert_close(torch.tensor(two["loss_matrix"]), torch.tensor(one["loss_matrix"]), rtol=1e-5, atol=1e-5)
    assert one["validation"] == two["validation"]
    assert (tmp_path / "two.svg").exists() and not (tmp_path / "two.json.progress.json").exists()


@pytest.mark.parametrize("method", ["headmap", "lora"])
def test_finetune_under_torchrun_trains_the_same_adapter(tiny_folder, tmp_path, method):
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"knowledge_circuit": {"0": {"retain_heads": [1, 2]}, "1": {"retain_heads": [0]}}}))
    args = ["finetune.py", "--model", tiny_folder, "--dataset", "arc_easy", "--method", method,
            *(["--heads", str(heads)] if method == "headmap" else []), "--train-limit", "20", "--batch-size", "7",
            "--max-steps", "4", "--warmup", "1", "--eval-every", "2",
            "--val-limit", "6", "--eval-limit", "8", "--dropout", "0", "--lr", "1e-2", "--token-budget", "300"]
    launch(*args, "--out", str(tmp_path / "one"))
    launch(*args, "--out", str(tmp_path / "two"), processes=2)
    for name in ("adapter_model.safetensors", "training.json", "log.jsonl"):
        assert (tmp_path / "two" / name).exists()
    a, b = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("one", "two"))
    assert a.keys() == b.keys() and all(a[k].abs().max() > 0 for k in a if "up" in k or "lora_B" in k)
    # Adam moves every element by about lr whatever its gradient's size, so an element whose gradient is near zero
    # carries the two runs' different float summation orders into its weight: a few elements differ by up to
    # ~0.5% of lr (the CI machine's BLAS), the rest by rounding
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.max() < 1e-4 and diffs.mean() < 1e-7, (diffs.max(), diffs.mean())
    logs = [[json.loads(line) for line in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in ("one", "two")]
    assert [e["step"] for e in logs[1]] == [1, 2, 3, 4]
    for x, y in zip(*logs):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5) and x["grad_norm"] == pytest.approx(y["grad_norm"], 1e-4)
        assert x.get("val_loss", 0) == pytest.approx(y.get("val_loss", 0), abs=1e-5)
    records = [json.loads((tmp_path / n / "training.json").read_text()) for n in ("one", "two")]
    assert [r["processes"] for r in records] == [1, 2]
    assert records[0]["accuracy_before"] == records[1]["accuracy_before"]


def test_a_failing_rank_stops_the_run_with_its_message(tiny_folder, tmp_path):
    out = tmp_path / "run"
    (out / "resume").mkdir(parents=True)
    (out / "resume" / "checkpoint.pt").write_bytes(b"not a checkpoint")  # rank 0 reads it and fails; rank 1 waits for it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *TORCHRUN, "finetune.py", "--model", tiny_folder, "--dataset",
                             "arc_easy", "--method", "lora", "--train-limit", "8", "--max-steps", "1", "--eval-limit",
                             "4", "--val-limit", "4", "--out", str(out), "--resume", "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert f"error: checkpoint {out / 'resume' / 'checkpoint.pt'} cannot be read" in result.stderr, result.stderr


def test_explicit_device_map_gives_the_same_scores(tiny_folder, tmp_path):
    layout = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "cpu"}
    args = ["evaluate.py", "--model", tiny_folder, "--dataset", "arc_easy", "--limit", "12", "--log-samples"]
    launch(*args, "--out", str(tmp_path / "plain.json"))
    launch(*args, "--out", str(tmp_path / "mapped.json"), "--device-map", json.dumps(layout))
    plain, mapped = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "mapped"))
    assert mapped.pop("device_map") == json.dumps(layout) and plain.pop("device_map") is None
    assert plain == mapped
    heads = ["locate.py", "--model", tiny_folder, "--dataset", "arc_easy", "--prompt", "harness", "--pool", "40",
             "--samples", "4", "--heads-per-layer", "1", "--no-validate"]
    launch(*heads, "--out", str(tmp_path / "plain_heads.json"))
    launch(*heads, "--out", str(tmp_path / "mapped_heads.json"), "--device-map", "auto")
    plain, mapped = (json.loads((tmp_path / f"{n}_heads.json").read_text()) for n in ("plain", "mapped"))
    assert plain["knowledge_circuit"] == mapped["knowledge_circuit"] and plain["loss_matrix"] == mapped["loss_matrix"]


# ---------------------------------------------------------------- resuming under another process count

def _rank_resumes(rank, port, out, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from cli.torchrun import start_distributed
    start_distributed(torch.device("cpu"))
    state = train_tiny_lora(out, 0.0, batch_size=4, checkpoint_every=2, resume=True)
    if rank == 0:
        torch.save(state, result_path)


def test_a_one_process_run_resumes_under_two(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = train_tiny_lora(tmp_path / "full", 0.0, batch_size=4, checkpoint_every=2)
        with pytest.raises(KeyboardInterrupt):  # the checkpoint of step 2 survives
            train_tiny_lora(tmp_path / "cut", 0.0, stop_at=3, batch_size=4, checkpoint_every=2)
    finally:
        torch.set_num_threads(threads)
    torch.multiprocessing.spawn(_rank_resumes, args=(free_port(), tmp_path / "cut", tmp_path / "resumed.pt"),
                                nprocs=2)
    resumed = torch.load(tmp_path / "resumed.pt")
    for a, b in zip(resumed, full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
