"""--fsdp: the frozen model sharded with FSDP2 over torchrun's processes (gloo on CPU, one thread each) gives what one
process gives, for evaluate, locate and finetune, on a tiny random LLaMA and on SmolLM2; each rank holds half the
weights; two torchrun launchers on this host act as two machines; a sharded run stopped by SIGTERM resumes under
another number of ranks; bad combinations are one line."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TORCHRUN, assert_usage_error, free_port, launch


def check_sharding(record: dict, world: int = 2) -> None:
    """Each rank's shard, read from the shards themselves: at most 0.55 of the weights, all of them together."""
    sharding = record["sharding"]
    assert sharding["world"] == world and len(sharding["local_parameter_bytes"]) == world
    assert all(b <= 0.55 * sharding["full_parameter_bytes"] for b in sharding["local_parameter_bytes"])
    assert sum(sharding["local_parameter_bytes"]) == sharding["full_parameter_bytes"]


def test_evaluate_locate_and_finetune_sharded_equal_one_process(tiny_folder, tmp_path):
    model = ["--model", tiny_folder]
    # harness prompts: multi-token answers, so ranks run different numbers of continuation passes
    evaluate = ["evaluate.py", *model, "--dataset", "arc_easy", "--prompt", "harness", "--limit", "10",
                "--batch-size", "3", "--log-samples"]
    launch(*evaluate, "--out", str(tmp_path / "e1.json"))
    launch(*evaluate, "--out", str(tmp_path / "e2.json"), "--fsdp", processes=2)
    one, two = (json.loads((tmp_path / f"e{n}.json").read_text()) for n in (1, 2))
    check_sharding(two)
    assert one["sharding"] is None
    for task in one["results"]:
        a, b = one["results"][task], two["results"][task]
        assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])
        for x, y in zip(a["samples"], b["samples"]):
            assert x["scores"] == pytest.approx(y["scores"], abs=1e-5)
    locate = ["locate.py", *model, "--dataset", "arc_easy", "--prompt", "harness", "--pool", "30", "--samples", "5",
              "--heads-per-layer", "1", "--batch-size", "4", "--validate-limit", "8", "--random-trials", "2",
              "--token-budget", "100"]
    launch(*locate, "--out", str(tmp_path / "h1.json"))
    launch(*locate, "--out", str(tmp_path / "h2.json"), "--fsdp", processes=2)
    one, two = (json.loads((tmp_path / f"h{n}.json").read_text()) for n in (1, 2))
    assert len(odd_plan(tiny_folder, one)) % 2  # the plan is padded with an empty batch: a zero-weight pass ran
    check_sharding(two)
    assert one["knowledge_circuit"] == two["knowledge_circuit"] and one["validation"] == two["validation"]
    torch.testing.assert_close(torch.tensor(two["loss_matrix"]), torch.tensor(one["loss_matrix"]), rtol=1e-4, atol=0)
    heads = tmp_path / "h1.json"
    finetune = ["finetune.py", *model, "--heads", str(heads), "--train-limit", "20", "--batch-size", "7",
                "--max-steps", "4", "--warmup", "1", "--eval-every", "2", "--val-limit", "6", "--eval-limit", "8",
                "--lr", "1e-2", "--token-budget", "300"]
    launch(*finetune, "--out", str(tmp_path / "f1"))
    launch(*finetune, "--out", str(tmp_path / "f2"), "--fsdp", processes=2)
    check_adapters_and_logs(tmp_path / "f1", tmp_path / "f2")
    check_sharding(json.loads((tmp_path / "f2" / "training.json").read_text()))


def odd_plan(folder: str, heads: dict) -> list:
    """locate's plan of one layer's batches for the samples `heads` records (4 heads + "no head" a sample)."""
    from transformers import AutoTokenizer

    from data.scoring import answer_samples
    from data.tasks import open_task
    from headmap.batching import plan_batches
    examples = open_task("arc_easy", "harness").examples("train", 30)
    samples = answer_samples(AutoTokenizer.from_pretrained(folder), [examples[i] for i in heads["sample_indices"]])
    return plan_batches([len(ids) for ids, _ in samples], 5, 100)


def check_adapters_and_logs(one, two, steps=4):
    """Training losses within 1e-5 and the adapters as close as docs/scaling.md's data-parallel test has them."""
    logs = [[json.loads(line) for line in (n / "log.jsonl").read_text().splitlines()] for n in (one, two)]
    assert [e["step"] for e in logs[1]] == list(range(1, steps + 1))
    for x, y in zip(*logs):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x.get("val_loss", 0) == pytest.approx(y.get("val_loss", 0), abs=1e-5)
    a, b = (load_file(str(n / "adapter_model.safetensors")) for n in (one, two))
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert a.keys() == b.keys() and diffs.max() < 1e-4 and diffs.mean() < 1e-7, (diffs.max(), diffs.mean())


def test_two_launchers_on_this_host_act_as_two_machines_on_the_real_model(smollm2, tmp_path):
    """torchrun --nnodes 2 twice, c10d rendezvous on localhost: the multi-machine path, not only described; on
    SmolLM2-135M from the bundled GGUF (de-quantised once, rank 0 reading it; tied embeddings, sharded)."""
    args = ["evaluate.py", "--dataset", "arc_easy", "--prompt", "harness", "--limit", "6", "--batch-size", "2",
            "--log-samples", "--no-progress"]
    launch(*args[:-1], "--out", str(tmp_path / "one.json"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    port = free_port()
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                   "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                                   "--rdzv_id", "headmap-test", *args, "--fsdp", "--out", str(tmp_path / "two.json")],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    for launcher in launchers:
        _, err = launcher.communicate(timeout=300)
        assert launcher.returncode == 0, err
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    check_sharding(two)
    assert one["results"]["arc_easy"]["acc"] == two["results"]["arc_easy"]["acc"]
    for x, y in zip(one["results"]["arc_easy"]["samples"], two["results"]["arc_easy"]["samples"]):
        assert x["scores"] == pytest.approx(y["scores"], abs=1e-4)


def test_a_sharded_dora_run_stopped_by_sigterm_resumes_under_another_number_of_ranks(tiny_folder, tmp_path):
    """DoRA too (its magnitude is read from the whole weight once, and each pass sees the gathered layer)."""
    args = ["finetune.py", "--model", tiny_folder, "--dataset", "arc_easy", "--method", "dora", "--dropout", "0",
            "--train-limit", "24", "--batch-size", "4", "--max-steps", "6", "--warmup", "1", "--eval-every", "3", "--val-limit", "4",
            "--eval-limit", "4", "--lr", "1e-2", "--checkpoint-every", "1"]
    launch(*args, "--out", str(tmp_path / "whole"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    cut = tmp_path / "cut"
    launcher = subprocess.Popen([sys.executable, *TORCHRUN, *args, "--fsdp", "--out", str(cut), "--no-progress"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (cut / "resume" / "checkpoint.pt").exists():
        assert time.time() < deadline and launcher.poll() is None, launcher.stderr.read()
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # what SLURM sends: torchrun passes it to both ranks
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    step = torch.load(cut / "resume" / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= step < 6
    one_rank = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    resumed = subprocess.run([*one_rank, *args, "--out", str(cut), "--fsdp", "--resume", "--no-progress"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300)  # one rank now, sharded alike
    assert resumed.returncode == 0, resumed.stderr
    check_adapters_and_logs(tmp_path / "whole", cut, steps=6)


@pytest.mark.parametrize("args,message", [
    (["evaluate.py", "--dataset", "boolq", "--fsdp"], "--fsdp shards the model over torchrun's processes: run the "
                                                      "script under torchrun"),
    (["locate.py", "--dataset", "boolq", "--fsdp", "--device-map", "auto"], "use one or the other"),
])
def test_bad_fsdp_combinations_are_one_line(args, message, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WORLD_SIZE")}
    if "--device-map" in args:
        env["WORLD_SIZE"] = "2"  # as torchrun sets it: the refusal comes before any process group
    result = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=env)
    assert_usage_error(result, message)
