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
        assert (a["acc"], a["acc_norm"], a["n"]) == (b["acc"], b["acc_norm"], b["n"]) and a["n"] == 10
        assert len(a["samples"]) == len(b["samples"]) == 10  # every row scored by the sharded run, none dropped
        for x, y in zip(a["samples"], b["samples"]):
            assert x["scores"] == pytest.approx(y["scores"], abs=1e-5)
    locate = ["locate.py", *model, "--dataset", "arc_easy", "--prompt", "harness", "--pool", "30", "--samples", "5",
              "--heads-per-layer", "1", "--batch-size", "4", "--validate-limit", "8", "--random-trials", "2",
              "--token-budget", "100"]
    launch(*locate, "--out", str(tmp_path / "h1.json"))
    launch(*locate, "--out", str(tmp_path / "h2.json"), "--fsdp", processes=2)
    one, two = (json.loads((tmp_path / f"h{n}.json").read_text()) for n in (1, 2))
    # a layer's plan of batches does not split evenly over the two ranks: the lighter one ran zero-weight passes to
    # keep in step (observed: the run counts them), and the numbers are still one process's
    assert sum(two["sharding"]["padding_passes"]) > 0
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


def test_each_decoder_layer_is_its_own_fsdp_unit_gathered_one_at_a_time_and_only_rank_0_reads(tmp_path):
    """The wrapping itself, not its per-rank record (which wrapping only the root would give alike): a forward holds
    the root and at most two units unsharded at once (FSDP2 gathers the next ahead), never the whole model, and the
    input embeddings are sharded again when the LM head runs."""
    from tests.conftest import tiny_llama
    tiny_llama(layers=6).save_pretrained(tmp_path / "model")  # many small layers: one layer is a small share
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *TORCHRUN, "tests/fsdp_probe.py", str(tmp_path / "model"),
                           str(tmp_path / "probe.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ranks = json.loads((tmp_path / "probe.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and [r["reads"] for r in ranks] == [1, 0]  # rank 0 alone read it
    for r in ranks:  # untied: the embeddings and the LM head are units of their own, gathered apart
        assert len(r["decoder_layers"]) == 6
        assert r["units"] == sorted(r["decoder_layers"] + ["", "lm_head", "model.embed_tokens"])  # + the root
        assert r["gathered_at_head"]["embeddings_sharded"]
        assert r["root_bytes"] + r["head_bytes"] <= r["gathered_at_head"]["bytes"] <= (
            r["root_bytes"] + r["head_bytes"] + r["layer_bytes"])  # the last layer may not be resharded yet
        assert r["root_bytes"] + r["layer_bytes"] <= r["most_gathered_bytes"] <= (
            r["root_bytes"] + max(2 * r["layer_bytes"], r["layer_bytes"] + r["head_bytes"]))
        assert r["most_gathered_bytes"] < 0.75 * r["full_bytes"]


def check_adapters_and_logs(one, two, steps=4):
    """Training losses within 1e-5 and the adapters as close as docs/scaling.md's data-parallel test has them."""
    logs = [[json.loads(line) for line in (n / "log.jsonl").read_text().splitlines()] for n in (one, two)]
    assert [e["step"] for e in logs[0]] == [e["step"] for e in logs[1]] == list(range(1, steps + 1))
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
    assert len(one["results"]["arc_easy"]["samples"]) == len(two["results"]["arc_easy"]["samples"]) == 6
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
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    # stopped on the signal itself (a rank's own line; the other may be cut off mid-collective), not by a crash or
    # a kill, which print no such line
    assert "terminated (SIGTERM); continue with: python finetune.py " in err, err
    step = torch.load(cut / "resume" / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= step < 6
    before = (cut / "log.jsonl").read_text().splitlines()[:step]
    one_rank = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    resumed = subprocess.run([*one_rank, *args, "--out", str(cut), "--fsdp", "--resume", "--no-progress"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300)  # one rank now, sharded alike
    assert resumed.returncode == 0, resumed.stderr
    # continued after the checkpoint's step, not started again: the steps before it were not run again (their log
    # lines, with their clock times, are the first run's)
    assert f"resuming at step {step}" in resumed.stdout
    assert (cut / "log.jsonl").read_text().splitlines()[:step] == before
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


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
def test_fsdp_refuses_a_sliding_window_model_before_any_weight_is_read(kind, tmp_path):
    """Mistral's sliding_window and Gemma 3's sliding_attention layers: refused by name, from the config alone."""
    from transformers import Gemma3TextConfig, MistralConfig

    from cli.exits import UsageError
    from cli.torchrun import load_sharded
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
    config = MistralConfig(**small, sliding_window=16) if kind == "mistral" else Gemma3TextConfig(**small)
    config.save_pretrained(tmp_path)  # a config and no weights: the refusal must come before any read
    with pytest.raises(UsageError, match=f"--fsdp does not take a model with sliding-window attention \\({config.model_type}"):
        load_sharded(str(tmp_path), torch.float32, torch.device("cpu"))
