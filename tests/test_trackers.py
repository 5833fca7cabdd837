"""--report-to: what finetune, locate and evaluate send to TensorBoard, Weights & Biases (offline) and MLflow (its
file store), read back through each tracker's own reader: the same per-step numbers as log.jsonl, the settings as
the run's config, each step exactly once after a SIGTERM and --resume (the same tracker run continued); a tracker
that is not installed refused in one line; one that fails mid-run warns once and the run goes on."""
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, assert_usage_error, needed, run

ALL = "tensorboard,wandb,mlflow"


def tracker_env(tmp_path) -> dict:
    """W&B offline and quiet; MLflow on a file store in tmp_path (its default, a SQLite file, needs the full mlflow
    package; the suite installs mlflow-skinny)."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
            "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true"}


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(folder, run_id: str) -> list:
    """Every record of the offline runs of `run_id` under `folder`, read from W&B's own files: a LevelDB-style log
    (32 KiB blocks of records with a 7-byte header) of wandb_internal_pb2.Record protobufs after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb
    found = []
    for path in sorted(folder.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        data, pos, partial = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0:
                break
            partial = chunk if kind in (1, 2) else partial + chunk
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = pb.Record()
                record.ParseFromString(partial)
                found.append(record)
    return found


def wandb_history(records) -> dict[str, list[tuple[int, float]]]:
    series = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for key, value in items.items():
                if not key.startswith("_"):
                    series.setdefault(key, []).append((int(items.get("_step", record.history.step.num)), value))
    return series


def wandb_config(records) -> dict:
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config |= {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}
    return config


def mlflow_series(tmp_path, run_id: str, key: str):
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # the reader of the store the test's runs wrote (tracker_env)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)], client.get_run(run_id).data.params


def finetune_args(tiny_run, out, *extra):
    return ["finetune.py", "--model", str(tiny_run / "model"), "--method", "lora", "--dataset", "arc_easy",
            "--train-limit", "24", "--batch-size", "4", "--max-steps", "30", "--epochs", "10", "--eval-every", "10",
            "--val-limit", "4", "--eval-limit", "4", "--checkpoint-every", "3", "--warmup", "0", "--no-progress",
            "--out", str(out), "--report-to", ALL, *extra]


def test_finetune_reports_every_step_once_to_each_tracker_across_a_sigterm_and_resume(tiny_run, tmp_path):
    for module in ("tensorboard", "wandb", "mlflow"):
        needed(module)
    out, env = tmp_path / "run", tracker_env(tmp_path)
    proc = subprocess.Popen([sys.executable, *finetune_args(tiny_run, out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env)
    deadline = time.time() + 180
    while not (out / "resume" / "checkpoint.pt").exists() or len((out / "log.jsonl").read_text().splitlines()) < 5:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    ids = json.loads((out / "resume" / "trackers.json").read_text())
    resumed = run(*finetune_args(tiny_run, out, "--resume"), **env)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "resume" / "trackers.json").read_text()) == ids  # the same tracker runs, continued
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    want = {key: [(e["step"], e[key]) for e in log if key in e] for key in ("loss", "lr", "grad_norm", "val_loss")}
    base = json.loads((out / "training.json").read_text())
    want["val_loss"] = [(0, base["val_loss_before"])] + want["val_loss"]  # the base model's, at step 0
    settings = json.loads((out / "resume" / "before.json").read_text())["settings"]

    tensorboard = tensorboard_scalars(out / "trackers" / "tensorboard")
    records = wandb_records(out / "trackers", ids["wandb"])
    wandb = wandb_history(records)
    for key, series in want.items():  # every step exactly once, with log.jsonl's numbers
        assert [s for s, _ in tensorboard[key]] == [s for s, _ in series], key
        assert [v for _, v in tensorboard[key]] == pytest.approx([v for _, v in series], rel=1e-6), key
        assert wandb[key] == pytest.approx(series, rel=1e-9), key
        got, params = mlflow_series(tmp_path, ids["mlflow"], key)
        assert sorted(got) == pytest.approx(series, rel=1e-9), key
    for series in (tensorboard, wandb):
        assert series["accuracy_after"][-1][1] == pytest.approx(base["accuracy_after"])
        assert series["trainable_parameters"][-1][1] == base["trainable_parameters"]
    config = wandb_config(records)
    assert all(config[k] == v for k, v in settings.items() if k != "circuit"), config
    assert params["lr"] == str(settings["lr"]) and params["method"] == "lora"
    assert len(list((out / "trackers" / "wandb").glob("offline-run-*"))) == 2  # one per process, one run id
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "curves.svg",
                                       "log.jsonl", "resume", "trackers", "training.json"]


def test_locate_and_evaluate_report_their_numbers_and_the_heat_map(tiny_run, tmp_path):
    needed("tensorboard")
    heads = tmp_path / "heads.json"
    done = run("locate.py", "--dataset", "arc_easy", "--model", str(tiny_run / "model"), "--pool", "8", "--samples",
               "2", "--validate-limit", "8", "--random-trials", "2", "--no-progress", "--out", str(heads),
               "--report-to", "tensorboard")
    assert done.returncode == 0, done.stderr
    result = json.loads(heads.read_text())
    scalars = tensorboard_scalars(tmp_path / "heads.trackers" / "tensorboard")
    assert [s for s, _ in scalars["all_heads_loss"]] == [1, 2]  # a step per layer
    assert [v for _, v in scalars["all_heads_loss"]] == pytest.approx([sum(r) / len(r) for r in result["loss_matrix"]])
    chosen = [sum(row[h] for h in result["knowledge_circuit"][str(layer)]["retain_heads"]) / 1
              for layer, row in enumerate(result["loss_matrix"])]
    assert [v for _, v in scalars["chosen_heads_loss"]] == pytest.approx(chosen)
    assert scalars["validation_circuit_masked"] == [(3, pytest.approx(result["validation"]["circuit_masked"]))]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "heads.trackers" / "tensorboard"))
    events.Reload()
    assert events.Tags()["images"] == ["heatmap"]
    scores = tmp_path / "scores.json"
    done = run("evaluate.py", "--dataset", "arc_easy", "--model", str(tiny_run / "model"), "--limit", "6",
               "--no-progress", "--out", str(scores), "--report-to", "tensorboard", "--run-name", "tiny")
    assert done.returncode == 0, done.stderr
    r = json.loads(scores.read_text())["results"]["arc_easy"]
    scalars = tensorboard_scalars(tmp_path / "scores.trackers" / "tensorboard")
    for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"):
        assert scalars[f"arc_easy/{key}"] == [(0, pytest.approx(r[key]))], key


def test_a_tracker_that_is_not_installed_is_refused_with_its_pip_command(tmp_path):
    fake = tmp_path / "site" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named wandb (stand-in)')")
    for script in (["finetune.py", "--method", "lora", "--dataset", "arc_easy"], ["locate.py", "--dataset", "boolq"],
                   ["evaluate.py", "--dataset", "boolq"]):
        done = run(*script, "--out", str(tmp_path / "out"), "--report-to", "tensorboard,wandb",
                   PYTHONPATH=str(tmp_path / "site"))
        assert_usage_error(done, "--report-to wandb needs its package, which is not installed")
        assert done.stderr.strip().endswith("; pip install wandb")
    assert_usage_error(run("evaluate.py", "--dataset", "boolq", "--report-to", "comet"), "--report-to comet: not a "
                       "tracker; pass none, tensorboard, wandb, mlflow or a comma list")


def test_a_tracker_that_fails_mid_run_warns_once_and_the_others_go_on(tmp_path, capsys):
    needed("tensorboard")
    from cli.trackers import Reporter

    class Unreachable:  # an MLflow whose server went away mid-run
        calls = 0

        def log_metrics(self, *args, **kwargs):
            Unreachable.calls += 1
            raise ConnectionError("API request to http://tracking:5000 failed: connection refused")

    reporter = Reporter(["tensorboard"], str(tmp_path), "run", {"lr": 1e-3})
    reporter.runs["mlflow"] = Unreachable()
    for step in (1, 2, 3):
        reporter.log({"loss": 1.0 / step}, step)
    reporter.close()
    err = capsys.readouterr().err
    assert err.count("warning: --report-to mlflow stopped: API request to http://tracking:5000 failed") == 1
    assert Unreachable.calls == 1  # dropped after its failure, not retried every step
    assert tensorboard_scalars(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
