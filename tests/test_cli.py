"""The scripts as a user runs them: real accuracies, and one-line errors with exit code 2."""
import json
import os

import pytest
import torch

from tests.conftest import assert_usage_error, run


@pytest.mark.parametrize("args,message", [
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--dataset", "piqa", "--split", "test"], "available splits: train, validation"),
    (["--dataset", "boolq", "--limit", "0"], "--limit must be at least 1"),
    (["--dataset", "boolq", "--model", "/no/such/model.gguf"], "GGUF file /no/such/model.gguf does not exist"),
    (["--dataset", "boolq", "--out", "/proc/nope/r.json"], "cannot write /proc/nope/r.json"),
    (["--dataset", "boolq", "--random-mask"], "--random-mask needs --mask"),
    (["--dataset", "boolq", "--mask", "/no/heads.json"], "does not exist"),
    (["--dataset", "boolq", "--model", "/no/such/model"], "model folder /no/such/model does not exist"),
    (["--dataset", "boolq", "--adapter", "/no/adapter"], "/no/adapter has no adapter_config.json"),
    (["--dataset", "boolq", "--device-map", "{gpu0"], "--device-map '{gpu0' is neither auto, balanced, sequential"),
])
def test_evaluate_bad_input_is_one_line_and_exit_2(args, message):
    assert_usage_error(run("evaluate.py", *args), message)


def test_evaluate_writes_real_accuracy(smollm2, tmp_path):
    out = tmp_path / "r.json"
    result = run("evaluate.py", "--dataset", "boolq,arc_easy", "--limit", "20",
                 "--out", str(out), "--log-samples", "--no-progress")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    for name in ("boolq", "arc_easy"):
        r = data["results"][name]
        assert r["n"] == 20 and 0.0 <= r["acc"] <= 1.0 and len(r["samples"]) == 20
        assert r["acc"] == sum(s["pred"] == s["gold"] for s in r["samples"]) / 20
    assert "boolq" in result.stdout and "acc_norm" in result.stdout and "no adapter, no mask" in result.stdout
    assert data["model"] == "smollm2-135m" and data["prompt"] == "paper" and data["limit"] == 20
    assert data["dtype"] == "float32" and data["device"] == "cpu" and "torch" in data["versions"]
    r = data["results"]["boolq"]
    assert r["acc_stderr"] == pytest.approx((r["acc"] * (1 - r["acc"]) / 19) ** 0.5)
    assert r["data"] == {"source": "bundled", "caveat": None}


def test_evaluate_with_heads_masked(smollm2, tmp_path):
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"knowledge_circuit": {str(layer): {"retain_heads": [0, 4, 8]} for layer in range(30)},
                                 "model": "smollm2-135m", "prompt": "harness"}))
    outs = {}
    for name, extra in [("none", []), ("circuit", ["--mask", str(heads)]),
                        ("random", ["--mask", str(heads), "--random-mask", "--seed", "3"])]:
        outs[name] = tmp_path / f"{name}.json"
        result = run("evaluate.py", "--dataset", "arc_easy", "--limit", "8",
                     "--out", str(outs[name]), "--log-samples", "--no-progress", *extra)
        assert result.returncode == 0, result.stderr
        assert ("--prompt harness (from" in result.stderr) == bool(extra)  # the circuit's prompt style, said so
    data = {k: json.loads(v.read_text()) for k, v in outs.items()}
    assert data["circuit"]["mask"]["heads"]["7"] == [0, 4, 8] and data["circuit"]["prompt"] == "harness"
    random_heads = data["random"]["mask"]["heads"]
    assert all(len(v) == 3 for v in random_heads.values()) and random_heads != data["circuit"]["mask"]["heads"]
    scores = {k: [s["scores"] for s in d["results"]["arc_easy"]["samples"]] for k, d in data.items()}
    assert scores["none"] != scores["circuit"] and scores["circuit"] != scores["random"]


def test_a_circuit_of_another_model_is_refused_unless_forced(tmp_path):
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"knowledge_circuit": {"0": {"retain_heads": [1]}}, "model": "meta-llama/Llama-2-7b"}))
    assert_usage_error(run("evaluate.py", "--dataset", "boolq", "--mask", str(heads), "--model", "smollm2-135m"),
                       "--model smollm2-135m differs from meta-llama/Llama-2-7b recorded in")
    assert_usage_error(run("finetune.py", "--heads", str(heads), "--model", "smollm2-135m", "--dataset", "boolq"),
                       "pass --force to use it anyway")


def test_the_tokenizer_alone_of_a_gguf_is_the_loaded_models(smollm2):
    """load_tokenizer reads a GGUF's tokenizer without de-quantising it: the same ids as load_model's tokenizer."""
    from cli.loading import load_tokenizer
    text = "Question: Which gas do plants take in?\nAnswer: carbon dioxide"
    assert load_tokenizer("smollm2-135m")(text).input_ids == smollm2[1](text).input_ids


def test_help_answers_before_torch_is_imported():
    for script in ("evaluate.py", "locate.py", "finetune.py"):
        probe = (f"import runpy, sys; sys.argv = ['{script}', '--help']\n"
                 f"try: runpy.run_path('{script}', run_name='__main__')\n"
                 "except SystemExit: print('torch loaded:', 'torch' in sys.modules)")
        result = run("-c", probe)
        assert "default:" in result.stdout and "torch loaded: False" in result.stdout, result.stdout + result.stderr


def test_ctrl_c_prints_one_line_with_the_resume_command(monkeypatch, capsys):
    from cli.exits import run_script

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr("sys.argv", ["locate.py", "--dataset", "piqa"])
    with pytest.raises(SystemExit) as exit_:
        run_script(interrupted, resumable=True)
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted; continue with: python locate.py --dataset piqa --resume"


def test_evaluate_rejects_heads_out_of_range(smollm2, tmp_path):
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"knowledge_circuit": {"2": {"retain_heads": [9]}}}))
    result = run("evaluate.py", "--dataset", "boolq", "--mask", str(heads))
    assert_usage_error(result, "head(s) [9] out of range for 9 heads")


@pytest.mark.parametrize("args,message", [
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--dataset", "boolq", "--heads-per-layer", "9"], "--heads-per-layer must be in 1..8"),
    (["--dataset", "boolq", "--heads-per-layer", "0"], "--heads-per-layer must be at least 1, got 0"),
    (["--dataset", "boolq", "--samples", "0"], "--samples must be at least 1"),
    (["--dataset", "boolq", "--samples", "64"], "--samples 64 asks for more samples than the pool holds (10 rows of "
                                                "boolq train); pass --samples 10 or fewer or a --pool above 10"),
    (["--dataset", "boolq", "--out", "/proc/nope/heads.json"], "cannot write /proc/nope/heads.json"),
    (["--dataset", "boolq", "--device-map", '{"model.embed_tokens": "cpu"}'],
     "--device-map gives no device for model.layers.0."),
    (["--dataset", "boolq", "--device-map", '{"": "gpu7"}'], "--device-map does not fit"),
])
def test_locate_bad_input_is_one_line_and_exit_2(args, message):
    assert_usage_error(run("locate.py", "--pool", "10", "--samples", "2", *args), message)


def test_locate_end_to_end_on_the_real_model(smollm2, tmp_path):
    out = tmp_path / "heads.json"
    # harness prompts (about 30 tokens against the paper's 100): the same path, a third of the compute
    result = run("locate.py", "--dataset", "arc_easy", "--prompt", "harness", "--pool", "30", "--samples", "1",
                 "--validate-limit", "6", "--random-trials", "2", "--out", str(out))  # compute grows with D
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert sorted(data["knowledge_circuit"], key=int) == [str(i) for i in range(30)]
    assert all(len(v["retain_heads"]) == 2 for v in data["knowledge_circuit"].values())  # round(9 / 4)
    assert len(data["loss_matrix"]) == 30 and all(len(row) == 9 for row in data["loss_matrix"])
    assert len(data["sample_indices"]) == 1 and data["unmasked_loss"] > 0
    v = data["validation"]
    assert v["rows"] == 6 and len(v["random_masked"]) == 2 and 0 <= v["circuit_masked"] <= 1
    assert (tmp_path / "heads.svg").read_text().startswith("<?xml") and not (tmp_path / "heads.json.progress.json").exists()
    assert "circuit masked" in result.stdout


def circuit_file(tmp_path, heads=(0, 4), dataset="boolq", prompt="paper"):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"knowledge_circuit": {str(layer): {"retain_heads": list(heads)} for layer in range(30)},
                                "dataset": dataset, "prompt": prompt, "model": "smollm2-135m"}))
    return str(path)


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist; pass a heads.json written by locate.py"),
    ("not json", "cannot be read (JSONDecodeError"),
    ("out of range", "head(s) [9] out of range for 9 heads"),
    ("no heads", "HeadMap needs --heads"),
    ("budget", "--token-budget must be at least 1"),
    ("max steps", "--max-steps must be at least 1, got 0"),
    ("val limit", "--val-limit must be at least 1, got 0"),
    ("train limit", "--train-limit must be at least 1, got 0"),
])
def test_finetune_refuses_bad_input_before_training(case, message, tmp_path):
    args = {"missing": ["--heads", str(tmp_path / "none.json")],
            "not json": ["--heads", str(tmp_path / "bad.json")],
            "out of range": ["--heads", circuit_file(tmp_path, heads=(2, 9))],
            "no heads": ["--dataset", "boolq"],
            "budget": ["--method", "lora", "--dataset", "boolq", "--token-budget", "0"],
            "max steps": ["--method", "lora", "--dataset", "boolq", "--max-steps", "0"],
            "val limit": ["--method", "lora", "--dataset", "boolq", "--val-limit", "0"],
            "train limit": ["--method", "lora", "--dataset", "boolq", "--train-limit", "0"]}[case]
    (tmp_path / "bad.json").write_text("{oops")
    assert_usage_error(run("finetune.py", "--out", str(tmp_path / "run"), *args), message)
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_finetune_then_evaluate_the_adapter_and_its_merged_checkpoint(smollm2, tmp_path):
    out = tmp_path / "run"
    result = run("finetune.py", "--heads", circuit_file(tmp_path, prompt="harness"), "--train-limit", "40",
                 "--batch-size", "8", "--token-budget", "256", "--max-steps", "2", "--eval-every", "1",
                 "--eval-limit", "6", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "note: --warmup 0 (a tenth of the run's 2 steps" in result.stderr  # the paper's 100 scaled down
    assert "--prompt harness (from" in result.stderr and "--model smollm2-135m (from" in result.stderr
    record = json.loads((out / "training.json").read_text())
    assert record["method"] == "headmap" and record["adapter"]["variant"] == "mha" and record["steps"] == 2
    assert record["prompt"] == "harness" and record["data"] == {
        "source": "bundled", "caveat": "the bundled BoolQ train split has empty passages: only prompts without "
                                       "the passage (--prompt paper) are faithful on it"}
    assert 0 < record["val_loss_before"] < 20 and 0 < record["best_val_loss"] < 20  # nats per token
    assert record["trainable_parameters"] == 30 * (2 * 64 * 32 + 32 + 32 * 576 + 576)
    assert len((out / "log.jsonl").read_text().splitlines()) == 2 and "trainable parameters" in result.stdout
    # the model card: Hub front matter, then the run's own numbers, read here from training.json
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1].splitlines()
    assert front == ["base_model: HuggingFaceTB/SmolLM2-135M-Instruct", "library_name: peft", "tags:",
                     "- headmap", "- knowledge-circuit", "- boolq"]
    from data.scoring import stderr
    before, after = record["accuracy_before"], record["accuracy_after"]
    weights = record["base_weights"]  # the de-quantised GGUF file it trained on, not the hub's weights
    assert weights["gguf_file"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and len(weights["sha256"]) == 64
    assert weights["quantisation"].startswith("Q4_1") and record["versions"]["torch"] == torch.__version__
    for shown in (f"| trainable parameters | {record['trainable_parameters']:,} |", "| steps | 2 |",
                  f"{record['best_val_loss']:.4f} at step {record['best_step']}",
                  f"| acc on 6 rows of validation (± standard error) | {before:.3f} ± {stderr(before, 6):.3f} before, "
                  f"{after:.3f} ± {stderr(after, 6):.3f} after |", f"circuit file `{record['circuit_file']}`",
                  f"| weights trained on | `SmolLM2-135M-Instruct.Q4_1.gguf` (sha256 `{weights['sha256'][:16]}…`",
                  "PeftModel.from_pretrained(", "lm_eval --model hf --model_args pretrained=HuggingFaceTB/SmolLM2-135M-"
                  f"Instruct,peft={out} --tasks boolq", f"load_adapter(model, \"{out}\")", "YOUR-NAME/YOUR-REPO",
                  f"huggingface-cli upload YOUR-NAME/YOUR-REPO {out} --exclude \"resume/*\""):
        assert shown in card, shown
    # the top of the folder is what an upload needs; the resumable state lives apart
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "curves.svg",
                                       "headmap.json", "log.jsonl", "resume", "training.json"]
    assert sorted(os.listdir(out / "resume")) == ["before.json", "checkpoint.pt"]
    settings = json.loads((out / "resume" / "before.json").read_text())["settings"]
    assert {"rank", "scaling", "variant", "circuit"} <= set(settings) and not {"alpha", "dropout"} & set(settings)
    merged = run("merge.py", "--adapter", str(out), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    merged_card = (tmp_path / "merged" / "README.md").read_text()
    assert merged_card.split("---\n")[1].splitlines()[:2] == ["base_model: HuggingFaceTB/SmolLM2-135M-Instruct",
                                                             "base_model_relation: merge"]
    for shown in (f"| adapter | `{out}` (headmap) |", "o_proj weight gained s W_up W_down",
                  f"{after:.3f} ± {stderr(after, 6):.3f} after", f"from_pretrained(\"{tmp_path / 'merged'}\")"):
        assert shown in merged_card, shown
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["adapter"] == str(out)  # as given
    scores = {}
    for name, extra in [("adapter", ["--adapter", str(out)]),  # prompt style and base model from training.json
                        ("merged", ["--model", str(tmp_path / "merged"), "--prompt", "harness"])]:
        scored = run("evaluate.py", "--dataset", "boolq", "--limit", "6", "--out", str(tmp_path / f"{name}.json"),
                     "--log-samples", "--no-progress", *extra)
        assert scored.returncode == 0, scored.stderr
        written = json.loads((tmp_path / f"{name}.json").read_text())
        assert written["prompt"] == "harness"
        scores[name] = written["results"]["boolq"]
        if name == "adapter":
            assert "--prompt harness (from" in scored.stderr and f"adapter {out}" in scored.stdout
    assert scores["adapter"]["acc"] == record["accuracy_after"] == scores["merged"]["acc"]
    for a, m in zip(scores["adapter"]["samples"], scores["merged"]["samples"]):
        assert a["scores"] == pytest.approx(m["scores"], abs=1e-3)


def test_an_adapter_of_another_base_model_is_refused(smollm2, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    model, tokenizer = smollm2
    other = tmp_path / "other"  # a different (tiny, random) base model with the same tokenizer
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    from headmap.adapters import attach_lora
    from headmap.saving import save_adapter
    adapter = attach_lora(model, rank=2)
    save_adapter(adapter, str(tmp_path / "adapter"))
    adapter.remove()
    (tmp_path / "adapter" / "training.json").write_text(json.dumps({"base_model": "smollm2-135m", "prompt": "paper"}))
    assert_usage_error(run("evaluate.py", "--dataset", "boolq", "--adapter", str(tmp_path / "adapter"), "--model",
                           str(other)), "differs from smollm2-135m recorded in")
    assert_usage_error(run("evaluate.py", "--dataset", "boolq", "--limit", "2", "--adapter", str(tmp_path / "adapter"),
                           "--model", str(other), "--force"), "cannot load adapter")


@pytest.mark.parametrize("model_type,message", [
    ("blt", "BltForCausalLM: the stock model's own forward fails in transformers"),  # its cache cannot be built
    ("gemma3n", "requires the timm library"),  # its vision tower needs a package that is not installed
])
def test_a_model_transformers_cannot_run_is_one_line_and_exit_2(smollm2, tmp_path, model_type, message):
    from safetensors.torch import save_file
    from tests.architectures import tiny_config, tiny_model
    if model_type == "gemma3n":  # cannot be built here, so only its config and an empty checkpoint are saved
        tiny_config(model_type).save_pretrained(tmp_path)
        save_file({}, str(tmp_path / "model.safetensors"))
    else:
        tiny_model(model_type).save_pretrained(tmp_path)
    smollm2[1].save_pretrained(tmp_path)
    assert_usage_error(run("evaluate.py", "--dataset", "boolq", "--limit", "2", "--model", str(tmp_path)), message)
