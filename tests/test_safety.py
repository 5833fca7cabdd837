"""No code runs from a file a user hands over or a run leaves, one live run per --out, rows past the model's
context, SIGTERM, '~' in paths, and a library that refuses its own misuse (notebook-style): each mistake made as a
user makes it, the refusal asserted as one line (exit 2; a ValueError in the library), and nothing of the user's
lost or run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, assert_usage_error, run, tiny_llama


class Payload:
    """What a doctored checkpoint.pt would carry: unpickling it creates `marker` (a stand-in for any command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def lora_run(tiny_run, out, *extra):
    return ["finetune.py", "--model", str(tiny_run / "model"), "--method", "lora", "--dataset", "arc_easy",
            "--train-limit", "16", "--batch-size", "4", "--eval-every", "1", "--val-limit", "4", "--eval-limit", "4",
            "--checkpoint-every", "1", "--warmup", "0", "--no-progress", "--out", str(out), *extra]


def test_a_checkpoint_carrying_code_is_refused_and_nothing_in_it_runs(tiny_run, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "ran"
    out.mkdir()
    torch.save({"adapter": {}, "step": 1, "hook": Payload(marker)}, out / "checkpoint.pt")
    assert_usage_error(run(*lora_run(tiny_run, out, "--max-steps", "2", "--resume")),
                       "holds more than tensors and plain values (pickled code?), so it was not loaded")
    assert not marker.exists()
    # written where a run before the resume/ folder kept it: --resume moved it there, and still ran nothing
    torch.load(out / "resume" / "checkpoint.pt", weights_only=False)  # the payload is real: unpickled, it runs
    assert marker.exists()


def remote_code_model(tiny_run, folder, marker):
    """tiny_run's model as a model type transformers does not know, whose config's auto_map names its own code;
    importing that code creates `marker`."""
    shutil.copytree(tiny_run / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="marker_llama", architectures=["MarkerForCausalLM"],
                  auto_map={"AutoConfig": "modeling_marker.MarkerConfig",
                            "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_marker.py").write_text(f"""import pathlib
pathlib.Path({str(marker)!r}).touch()
from transformers import LlamaConfig, LlamaForCausalLM


class MarkerConfig(LlamaConfig):
    model_type = "marker_llama"


class MarkerForCausalLM(LlamaForCausalLM):
    config_class = MarkerConfig
""")


def test_a_model_with_its_own_code_runs_it_only_with_trust_remote_code(tiny_run, tmp_path):
    model, marker, out = tmp_path / "custom", tmp_path / "ran", tmp_path / "r.json"
    remote_code_model(tiny_run, model, marker)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    args = ["evaluate.py", "--dataset", "arc_easy", "--limit", "2", "--model", str(model), "--no-progress"]
    assert_usage_error(run(*args, **env), "ships its own Python code (auto_map in its config.json), which was not "
                                          "run; pass --trust-remote-code")
    assert_usage_error(run("locate.py", "--dataset", "arc_easy", "--model", str(model), "--pool", "4", "--samples", "2",
                           "--out", str(tmp_path / "h.json"), **env), "--trust-remote-code")
    assert not marker.exists()
    done = run(*args, "--trust-remote-code", "--out", str(out), **env)
    assert done.returncode == 0, done.stderr
    assert marker.exists() and json.loads(out.read_text())["trust_remote_code"] is True


HOLD = ("import sys, time; sys.path.insert(0, '.'); from cli.claim import hold_output; hold_output(sys.argv[1]); "
        "print('held', flush=True); time.sleep(float(sys.argv[2]))")  # a live run's claim on --out, and nothing else


def test_a_second_run_on_a_live_runs_out_is_refused_naming_it(tmp_path):
    """finetune and locate each refuse an --out that a live run holds (--overwrite and --resume too), naming it; kill
    -9 leaves nothing stale behind; a normal exit removes the claim's file. A process holding the claim stands in for
    the live run: the refusal comes before any model loads, whoever holds it."""
    out, heads = tmp_path / "run", tmp_path / "heads.json"
    live = [subprocess.Popen([sys.executable, "-c", HOLD, str(path), "600"], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True) for path in (out, heads)]
    try:
        assert [p.stdout.readline() for p in live] == ["held\n", "held\n"]
        finetune = ["finetune.py", "--method", "lora", "--dataset", "arc_easy", "--out", str(out)]
        locate = ["locate.py", "--dataset", "arc_easy", "--out", str(heads)]
        for args, holder in ((finetune, live[0]), (locate, live[1])):
            for flag in ("--overwrite", "--resume"):
                assert_usage_error(run(*args, flag), f"is in use by a run still going (pid {holder.pid} on ")
    finally:
        for p in live:
            p.kill()
            p.communicate()
    assert (tmp_path / ".run.lock").exists()  # left by the killed holder, but not held: the OS let go of it
    again = subprocess.run([sys.executable, "-c", HOLD, str(out), "0"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout == "held\n", again.stderr
    assert not (tmp_path / ".run.lock").exists()  # removed at the normal exit


def test_under_torchrun_rank_0_holds_the_claim_and_removes_it_at_the_end(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(f"import json, os, sys\nsys.path.insert(0, {str(ROOT)!r})\n" + """
import torch.distributed as dist
from cli.claim import hold_output
dist.init_process_group("gloo")
hold_output(sys.argv[1])
pids = [None] * dist.get_world_size()
dist.all_gather_object(pids, os.getpid())
with open(os.path.join(os.path.dirname(sys.argv[1]), ".out.json.lock")) as f:
    held = json.load(f)
dist.barrier()  # both have read it before rank 0 ends and removes it
assert held["pid"] == pids[0] != pids[1], (held, pids)
print("held by rank 0")
dist.destroy_process_group()
""")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "out.json")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.count("held by rank 0") == 2, done.stderr
    assert not (tmp_path / ".out.json.lock").exists()


def test_sigterm_stops_finetune_like_ctrl_c_and_the_run_resumes(tiny_run, tmp_path):
    out = tmp_path / "run"
    args = lora_run(tiny_run, out, "--max-steps", "40", "--epochs", "10")
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    deadline = time.time() + 120
    while not (out / "resume" / "checkpoint.pt").exists():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("terminated (SIGTERM); continue with: python finetune.py ") and last.endswith("--resume")
    step = torch.load(out / "resume" / "checkpoint.pt", weights_only=True)["step"]  # whole
    assert 0 < step < 40
    before = (out / "log.jsonl").read_text().splitlines()[:step]
    done = run(*args, "--resume")
    assert done.returncode == 0, done.stderr
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # every step once
    # continued after the checkpoint, not run again from scratch (which would also log every step once): it says
    # so, and the steps up to the checkpoint are the first run's own lines, clock times and all
    assert f"resuming at step {step}" in done.stdout
    assert (out / "log.jsonl").read_text().splitlines()[:step] == before


def test_a_quoted_tilde_is_the_home_folder(tiny_run, tmp_path):
    from cli.arguments import user_path
    home = os.path.expanduser("~")
    assert user_path("~/runs/x") == os.path.join(home, "runs/x")
    assert user_path("lm-eval:~/t.yaml,boolq") == f"lm-eval:{home}/t.yaml,boolq"
    assert user_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    done = run("evaluate.py", "--dataset", "arc_easy", "--limit", "2", "--model", str(tiny_run / "model"), "--out",
               "~/results/r.json", "--no-progress", HOME=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "results" / "r.json").exists() and not (ROOT / "~").exists()


def test_rows_past_the_models_context_are_cut_from_the_left_as_lm_eval_cuts_them(tiny_run, tmp_path):
    """A 64-position model, one row far longer: evaluate scores it as lm-eval does (the context's oldest tokens
    dropped so that context + answer less its last token fill the 64 positions) and says so."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = tmp_path / "short"
    shutil.copytree(tiny_run / "model", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    rows = [{"prompt": "Question: what is bright? Answer:", "choices": ["the sun", "a stone"], "answer": 0},
            {"prompt": "Once upon a time " * 40 + "the sky was", "choices": ["blue", "green sea"], "answer": 0}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    done = run("evaluate.py", "--dataset", str(data), "--model", str(model_dir), "--log-samples", "--no-progress",
               "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "note: 1 of 2 rows are longer than the model's 64 positions: their context was cut from the left" in done.stderr
    result = json.loads(out.read_text())["results"][str(data)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    most = 0
    for row, sample in zip(rows, result["samples"]):
        for choice, got in zip(row["choices"], sample["scores"]):
            ctx = tok(row["prompt"]).input_ids
            cont = tok(row["prompt"] + " " + choice).input_ids[len(ctx):]
            fed = (ctx + cont)[-65:][:-1]  # lm-eval's rule, written out
            most = max(most, len(ctx) + len(cont) - 65)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([fed])).logits[0].float(), -1)
            want = sum(logprobs[len(fed) - len(cont) + i, t].item() for i, t in enumerate(cont))
            assert got == pytest.approx(want, abs=1e-4)
    assert result["context_cut"] == {"rows": 1, "most_tokens": most, "limit": 64} and most > 80
    # an answer that alone takes more than the 64 positions: no cut of its context could score it; refused by row
    rows.append({"prompt": "Say it:", "choices": ["ok", "word " * 80], "answer": 0})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused_row = run("evaluate.py", "--dataset", str(data), "--model", str(model_dir), "--no-progress")
    assert_usage_error(refused_row, "row 3: its answer of ")
    assert "tokens does not fit the model's 64 positions; shorten it or leave the row out" in refused_row.stderr


# ---------------------------------------------------------------- the library, misused as a notebook does

def test_a_second_adapter_on_the_same_model_is_refused_until_the_first_is_removed(tmp_path):
    from headmap import attach_headmap, attach_lora, load_adapter, save_adapter
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16).requires_grad_(False)
    first = attach_headmap(model, {0: [1]}, rank=4)
    save_adapter(first, str(tmp_path / "a"))
    for again in (lambda: attach_headmap(model, {0: [1]}, rank=4), lambda: attach_lora(model, rank=4),
                  lambda: load_adapter(model, str(tmp_path / "a"))):
        with pytest.raises(ValueError, match=r"a headmap adapter is attached to this model already; call "
                                             r"adapter.remove\(\)"):
            again()
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert hooks == 1 and "_headmap_adapter" not in model.state_dict()  # one map, and the model's weights alone
    first.remove()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    second = attach_lora(model, rank=4)
    assert second.method == "lora"


def test_train_adapter_refuses_a_model_that_is_not_frozen():
    from headmap import attach_headmap, train_adapter
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16)  # requires_grad left on, as from_pretrained gives
    adapter = attach_headmap(model, {0: [1]}, rank=4)
    ids = torch.randint(3, 500, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with pytest.raises(ValueError, match=r"of the model's own tensors require gradients .*model.requires_grad_\(False\)"):
        train_adapter(model, adapter, [batch], steps=1, lr=1e-3)
    assert all(p.grad is None for p in model.parameters())
    model.requires_grad_(False)
    assert len(train_adapter(model, adapter, [batch], steps=1, lr=1e-3).losses) == 1
