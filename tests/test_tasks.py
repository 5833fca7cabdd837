"""Any task: the user's own files (two schemas, five formats, one-line errors naming file, row and field), one-target
scoring (exact match and NLL per token against one full forward per row), and lm-evaluation-harness tasks (the
examples and scores of lm-eval itself)."""
import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli.exits import UsageError
from data.files import DataError
from data.scoring import Scores, encode_pair, metrics, score_continuations
from data.common import CHOICE, TARGET, Example
from data.files import read_records
from data.tasks import open_task
from data.user_files import count_rows, sha256
from tests.conftest import needed

ROOT = Path(__file__).resolve().parent.parent
FACTS = ROOT / "examples" / "facts"
CHOICE_ROWS = [{"prompt": "2 + 2 =", "choices": ["4", "5"], "answer": 0},
               {"prompt": "The sky is", "choices": ["green", "blue", "red"], "answer": 1}]
CHOICE_EXAMPLES = [Example(("2 + 2 =",) * 2, (" 4", " 5"), 0, ("4", "5")),
                   Example(("The sky is",) * 3, (" green", " blue", " red"), 1, ("green", "blue", "red"))]


def write(path: Path, rows: list[dict]) -> Path:
    """`rows` in the format of `path`'s extension."""
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow
        import pyarrow.parquet as pq
        pq.write_table(pyarrow.Table.from_pylist(rows), path)
    elif name.endswith(".csv"):
        import csv
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows).encode()
        path.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    return path


@pytest.mark.parametrize("ext", [".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet"])
def test_every_format_gives_the_written_examples(tmp_path, ext):
    if ext == ".parquet":
        needed("pyarrow")
    task = open_task(str(write(tmp_path / f"rows{ext}", CHOICE_ROWS)))
    assert task.kind == CHOICE and task.splits == ("all",)
    assert task.examples() == CHOICE_EXAMPLES
    assert task.examples(limit=1) == CHOICE_EXAMPLES[:1]


def test_one_target_rows_and_the_delimiter(tmp_path):
    path = str(write(tmp_path / "facts.jsonl", [{"prompt": "The capital of France is", "target": "Paris"}]))
    assert open_task(path).kind == TARGET
    assert open_task(path).examples() == [Example(("The capital of France is",), (" Paris",), 0, ("Paris",))]
    example = open_task(path, delimiter="\n").examples()[0]
    assert example.continuations == ("\nParis",) and example.train_text == "The capital of France is\nParis"


def test_a_folder_has_splits_and_a_file_has_none(tmp_path):
    write(tmp_path / "train.jsonl", CHOICE_ROWS)
    write(tmp_path / "test.csv", CHOICE_ROWS[:1])
    task = open_task(str(tmp_path))
    assert (task.splits, task.train_split, task.eval_split) == (("train", "test"), "train", "test")
    assert task.examples() == CHOICE_EXAMPLES[:1] and task.examples("train") == CHOICE_EXAMPLES
    with pytest.raises(DataError, match="has no split 'validation' \\(it has train, test\\)"):
        task.check_split("validation")
    with pytest.raises(DataError, match="is one file, which has no splits"):
        open_task(str(tmp_path / "train.jsonl")).check_split("train")


def test_limit_reads_only_the_rows_it_needs(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHOICE_ROWS) + "{not json\n")
    assert open_task(str(path)).examples(limit=2) == CHOICE_EXAMPLES  # the broken third row is never read
    with pytest.raises(DataError, match=f"{path}: row 3 is not JSON"):
        open_task(str(path)).examples()


def test_provenance_counts_every_row_and_hashes_the_file(tmp_path):
    path = write(tmp_path / "rows.jsonl.gz", CHOICE_ROWS * 3)
    source = open_task(str(path)).source("all")
    assert source == {"source": "file", "path": str(path), "rows": 6,
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    csv_path = write(tmp_path / "rows.csv", [{"prompt": "two\nlines", "target": "x"}] * 4)
    assert count_rows(csv_path) == 4 and sha256(csv_path) == hashlib.sha256(csv_path.read_bytes()).hexdigest()


BAD_ROWS = {  # what breaks the schema -> what the error names
    "missing field": ({"prompt": "p", "choices": ["a", "b"]}, "row 2: has no field 'answer'"),
    "answer out of range": ({"prompt": "p", "choices": ["a", "b"], "answer": 2}, "row 2: field 'answer' is 2, out of range"),
    "no choices": ({"prompt": "p", "choices": [], "answer": 0}, "row 2: field 'choices' has 0 choices"),
    "one choice": ({"prompt": "p", "choices": ["a"], "answer": 0}, "row 2: field 'choices' has 1 choice;"),
    "duplicate choices": ({"prompt": "p", "choices": ["a", "b", "a"], "answer": 0}, "row 2: field 'choices' names 'a' twice"),
    "empty prompt": ({"prompt": " ", "choices": ["a", "b"], "answer": 0}, "row 2: field 'prompt' is empty"),
    "answer not an index": ({"prompt": "p", "choices": ["a", "b"], "answer": "b"}, "row 2: field 'answer' is 'b', not"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_bad_row_is_named_by_file_row_and_field(tmp_path, case):
    row, message = BAD_ROWS[case]
    path = write(tmp_path / "rows.jsonl", [CHOICE_ROWS[0], row])
    with pytest.raises(DataError, match=f"^{path} {message}".replace("(", "\\(").replace(")", "\\)")):
        open_task(str(path)).examples()


def test_an_empty_target_and_non_utf8_text(tmp_path):
    path = write(tmp_path / "facts.jsonl", [{"prompt": "p", "target": "x"}, {"prompt": "q", "target": ""}])
    with pytest.raises(DataError, match="facts.jsonl row 2: field 'target' is empty"):
        open_task(str(path)).examples()
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "p", "target": "x"}\n{"prompt": "caf\xe9", "target": "y"}\n')
    with pytest.raises(DataError, match="latin.jsonl: row 2 is not UTF-8 text"):
        open_task(str(latin)).examples()


def test_bad_input_is_one_line_and_exit_2_before_any_model_loads(tmp_path):
    path = write(tmp_path / "rows.jsonl", [CHOICE_ROWS[0], BAD_ROWS["duplicate choices"][0]])
    for script, *extra in (("evaluate.py",), ("locate.py",), ("finetune.py", "--method", "lora", "--out",
                                                                 str(tmp_path / "run"))):
        # a model that does not exist: reaching the model would be another error
        done = subprocess.run([sys.executable, script, "--dataset", str(path), "--model", "/no/such/model", *extra],
                              cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"error: {path} row 2: field 'choices' names 'a' twice")


def test_options_that_do_not_apply_are_refused(tmp_path):
    path = str(write(tmp_path / "rows.jsonl", CHOICE_ROWS))
    with pytest.raises(DataError, match="--prompt .* does not apply to --dataset"):
        open_task(path, prompt="harness")
    with pytest.raises(DataError, match="--target-delimiter .* does not apply to --dataset arc_easy"):
        open_task("arc_easy", delimiter="\n")
    with pytest.raises(DataError, match="unknown dataset 'arc_eazy'"):
        open_task("arc_eazy")


def test_the_worked_example_is_well_formed():
    for kind, schema in (("recall", TARGET), ("choice", CHOICE)):
        task = open_task(str(FACTS / kind))
        assert task.kind == schema and (task.train_split, task.eval_split) == ("train", "test")
        assert len(task.examples("train")) == 211 and len(task.examples("test")) == 90


# ---------------------------------------------------------------- one-target scoring

def test_target_metrics_by_hand():
    examples = [Example.with_choices("p", [t], 0) for t in ("a", "b", "c")]
    scores = Scores(logprob=[[-1.0], [-2.0], [-6.0]], greedy=[[True], [True], [False]], tokens=[[1], [1], [4]])
    got = metrics(TARGET, examples, scores)
    assert got["exact_match"] == pytest.approx(2 / 3) and got["correct"] == [True, True, False]
    assert got["nll_per_token"] == pytest.approx((1 + 2 + 6) / (1 + 1 + 4))


def test_exact_match_and_nll_equal_one_full_forward_per_row(smollm2):
    model, tokenizer = smollm2
    examples = open_task(str(FACTS / "recall")).examples("test", limit=12)
    scores = score_continuations(model, tokenizer, examples, batch_size=5, progress=False)
    greedy, logprob, tokens = [], [], []
    with torch.inference_mode():
        for ex in examples:  # the reference: the stock model, prompt + target in one pass
            ctx, cont = encode_pair(tokenizer, ex.prompts[0], ex.continuations[0])
            logits = model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1].float()
            greedy.append(logits.argmax(-1).tolist() == cont)
            logprob.append(torch.log_softmax(logits, -1)[range(len(cont)), cont].sum().item())
            tokens.append(len(cont))
    assert 0 < sum(greedy) < len(examples)  # some facts known, some not: both outcomes are checked
    assert [g[0] for g in scores.greedy] == greedy and [t[0] for t in scores.tokens] == tokens
    assert [s[0] for s in scores.logprob] == pytest.approx(logprob, abs=1e-4)
    got = metrics(TARGET, examples, scores)
    assert got["exact_match"] == sum(greedy) / len(examples)
    assert got["nll_per_token"] == pytest.approx(-sum(logprob) / sum(tokens), abs=1e-5)


def test_read_records_streams_a_long_file(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "p", "target": "t"}) + "\n" * 3 + json.dumps({"prompt": "q", "target": "u"}))
    assert [n for n, _ in read_records(path)] == [1, 2]  # blank lines are not rows


# ---------------------------------------------------------------- lm-evaluation-harness tasks

ROWS = 12

@pytest.fixture(scope="session")
def lm_eval_tasks(tmp_path_factory):
    """Task YAMLs that take lm-eval's own arc_easy and winogrande and swap their data for the first ROWS bundled
    rows (how a task runs offline), and a generate_until and a loglikelihood_rolling task on local rows."""
    lm_eval = needed("lm_eval")
    from data.commonsense import load_rows
    root, tasks = tmp_path_factory.mktemp("lm_eval_tasks"), Path(lm_eval.__file__).parent / "tasks"
    for name, split, config in (("arc_easy", "test", tasks / "arc" / "arc_easy.yaml"),
                                ("winogrande", "validation", tasks / "winogrande" / "default.yaml")):
        data = write(root / f"{name}.jsonl", load_rows(name, split)[:ROWS])
        (root / f"{name}.yaml").write_text(
            f"include: {config}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {data}\ntraining_split: null\n"
            + ("validation_split: null\n" if split == "test" else ""))
    data = write(root / "facts.jsonl", [{"prompt": "The capital of France is", "target": "Paris"}])
    for kind in ("generate_until", "loglikelihood_rolling"):
        (root / f"{kind}.yaml").write_text(
            f"task: my_{kind}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            f"output_type: {kind}\ndoc_to_text: '{{{{prompt}}}}'\ndoc_to_target: '{{{{target}}}}'\n")
    return root


@pytest.mark.parametrize("name", ["arc_easy", "winogrande"])
def test_lm_eval_task_gives_exactly_our_harness_examples(lm_eval_tasks, name):
    task = open_task(f"lm-eval:{lm_eval_tasks / name}.yaml")
    assert task.kind == CHOICE and task.source(task.eval_split)["task"] == name
    assert task.examples() == open_task(name, "harness").examples(limit=ROWS)


@pytest.mark.parametrize("kind", ["generate_until", "loglikelihood_rolling"])
def test_lm_eval_tasks_that_are_not_multiple_choice_are_refused(lm_eval_tasks, kind):
    with pytest.raises(DataError, match=f"lm-eval task my_{kind} is a {kind} task; .*only multiple_choice"):
        open_task(f"lm-eval:{lm_eval_tasks / kind}.yaml")


def test_an_unknown_lm_eval_task_is_named(lm_eval_tasks):
    with pytest.raises(DataError, match="lm-eval has no task 'arc_eazy' \\(did you mean arc_easy"):
        open_task("lm-eval:arc_eazy")


def test_lm_eval_missing_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(DataError, match="needs lm-evaluation-harness: pip install lm-eval"):
        open_task("lm-eval:arc_easy")


def readme_lm_eval_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    import re
    return re.search(r"<!-- lm-eval example -->\s*```python\n(.*?)```", text, re.S).group(1)


def test_evaluate_equals_lm_eval_and_the_readme_snippet_masks_heads_in_lm_eval(lm_eval_tasks, tiny_run, tmp_path):
    """evaluate.py --dataset lm-eval:TASK --mask heads.json gives lm-eval's own acc and acc_norm, run by the README's
    snippet (HFLM over the model, heads masked by mask_heads), and differs from the unmasked scores."""
    import evaluate
    from cli.json_records import write_json
    from headmap.circuit import circuit_entry
    model_dir, yaml = tiny_run / "model", lm_eval_tasks / "arc_easy.yaml"
    write_json(tmp_path / "heads.json", {**circuit_entry({0: [1, 2], 1: [0]}), "model": str(model_dir)})
    ours = {mask: evaluate.main(["--dataset", f"lm-eval:{yaml}", "--model", str(model_dir), "--no-progress",
                                 "--log-samples"] + (["--mask", str(tmp_path / "heads.json")] if mask else []))
            for mask in (False, True)}
    snippet = readme_lm_eval_snippet()
    for old, new in (('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(model_dir))),
                     ('"heads.json"', repr(str(tmp_path / "heads.json"))), ('tasks=["arc_easy"]', f"tasks=[{str(yaml)!r}]")):
        assert old in snippet
        snippet = snippet.replace(old, new)
    scope = {}
    exec(snippet, scope)
    theirs = scope["results"]["results"]["arc_easy"]
    masked = ours[True]["results"][f"lm-eval:{yaml}"]
    assert (masked["acc"], masked["acc_norm"]) == (theirs["acc,none"], theirs["acc_norm,none"])
    unmasked = ours[False]["results"][f"lm-eval:{yaml}"]
    harness = evaluate.main(["--dataset", "arc_easy", "--prompt", "harness", "--limit", str(ROWS), "--model",
                             str(model_dir), "--no-progress", "--log-samples"])["results"]["arc_easy"]
    assert [s["scores"] for s in unmasked["samples"]] == [s["scores"] for s in harness["samples"]]
    gaps = [abs(a - b) for u, m in zip(unmasked["samples"], masked["samples"]) for a, b in zip(u["scores"], m["scores"])]
    assert max(gaps) > 1e-2  # the mask reached the model lm-eval ran


def test_lm_eval_loads_a_headmap_adapter_through_peft_and_scores_as_evaluate_does(lm_eval_tasks, tiny_run, tmp_path):
    """lm-evaluation-harness with no code of ours (`--model hf --model_args pretrained=...,peft=...`) on a HeadMap
    adapter: the same per-row log-likelihoods and accuracy as `evaluate.py --adapter`."""
    import evaluate
    import lm_eval
    from transformers import AutoModelForCausalLM

    from headmap.adapters import attach_headmap
    from headmap.saving import save_adapter
    model_dir, yaml, folder = tiny_run / "model", lm_eval_tasks / "arc_easy.yaml", tmp_path / "headmap"
    model = AutoModelForCausalLM.from_pretrained(model_dir).requires_grad_(False)
    adapter = attach_headmap(model, {0: [1, 2], 1: [0]}, rank=4, scaling=2.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g))  # far from the identity: the adapter moves every score
    adapter.config["base_model_name_or_path"] = str(model_dir)
    save_adapter(adapter, str(folder))
    ours = evaluate.main(["--dataset", f"lm-eval:{yaml}", "--adapter", str(folder), "--no-progress",
                          "--log-samples"])["results"][f"lm-eval:{yaml}"]
    plain = evaluate.main(["--dataset", f"lm-eval:{yaml}", "--model", str(model_dir), "--no-progress",
                           "--log-samples"])["results"][f"lm-eval:{yaml}"]
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},peft={folder}",
                                     tasks=[str(yaml)], log_samples=True, batch_size=4, device="cpu")
    rows = sorted(theirs["samples"]["arc_easy"], key=lambda s: s["doc_id"])
    assert len(rows) == len(ours["samples"]) == ROWS
    for row, sample in zip(rows, ours["samples"]):
        assert [r[0][0] for r in row["resps"]] == pytest.approx(sample["scores"], abs=1e-4)
    assert ours["acc"] == theirs["results"]["arc_easy"]["acc,none"]
    assert ours["acc_norm"] == theirs["results"]["arc_easy"]["acc_norm,none"]
    moved = [abs(a - b) for o, p in zip(ours["samples"], plain["samples"]) for a, b in zip(o["scores"], p["scores"])]
    assert max(moved) > 0.1  # lm-eval ran the adapter, not the base model


# ---------------------------------------------------------------- the scripts on a file of one's own

def greedy_rows(model_dir: Path) -> tuple[list[dict], int]:
    """One-target rows for the tiny random model: for half of them the target is the model's own greedy next token
    (so exact match holds), for the others a word it does not predict. Returns the rows and how many are greedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows, greedy = [], 0
    for example in open_task(str(FACTS / "recall")).examples("train", limit=40):
        prompt = example.prompts[0]
        with torch.inference_mode():
            token = model(torch.tensor([tokenizer(prompt).input_ids])).logits[0, -1].argmax().item()
        text = tokenizer.decode([token])
        if greedy < 6 and text.startswith(" ") and text.strip() and encode_pair(tokenizer, prompt, text)[1] == [token]:
            rows.append({"prompt": prompt, "target": text[1:]})
            greedy += 1
        elif len(rows) - greedy < 6:
            rows.append({"prompt": prompt, "target": example.choices[0]})
    assert greedy == 6 and len(rows) == 12
    return rows, greedy


def test_locate_finetune_and_evaluate_on_a_file_of_ones_own(tiny_run, tmp_path, capsys):
    import evaluate
    import finetune
    import locate
    model = str(tiny_run / "model")
    rows, greedy = greedy_rows(tiny_run / "model")
    data = write(tmp_path / "facts.jsonl", rows)
    source = {"source": "file", "path": str(data), "rows": 12, "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    heads = locate.main(["--dataset", str(data), "--model", model, "--samples", "3", "--random-trials", "2",
                         "--heads-per-layer", "1", "--out", str(tmp_path / "heads.json"), "--no-progress"])
    assert heads["kind"] == TARGET and heads["data"] == source and heads["split"] == "all"
    assert heads["validation"]["metric"] == "exact_match" and heads["validation"]["unmasked"] == greedy / 12
    assert len(heads["sample_indices"]) == 3 and all(i < 12 for i in heads["sample_indices"])

    record = finetune.main(["--heads", str(tmp_path / "heads.json"), "--max-steps", "2", "--val-fraction", "0.25",
                            "--batch-size", "4", "--out", str(tmp_path / "run"), "--no-progress"])
    assert record["dataset"] == str(data) and record["data"] == source and record["metric"] == "exact_match"
    assert record["held_out"] == "3 rows (25%) carved out of all with seed 0" and record["eval_rows"] == 3
    assert record["eval_split"] == "held-out rows"
    with pytest.raises(UsageError, match="was trained on these rows .* pass --force"):
        evaluate.main(["--dataset", str(data), "--adapter", str(tmp_path / "run"), "--no-progress"])
    scored = evaluate.main(["--dataset", str(data), "--adapter", str(tmp_path / "run"), "--force", "--no-progress"])
    result = scored["results"][str(data)]
    assert result["kind"] == TARGET and result["data"] == source and result["n"] == 12
    assert set(result) >= {"exact_match", "exact_match_stderr", "nll_per_token"}

    # Scored on other rows, the adapter and the circuit are a transfer, said in one warning each.
    write(data, rows[:11])
    evaluate.main(["--dataset", str(data), "--adapter", str(tmp_path / "run"), "--no-progress"])
    assert f"warning: {data} has changed since the adapter {tmp_path / 'run' / 'training.json'}" in capsys.readouterr().err
    other = write(tmp_path / "other.jsonl", rows)
    evaluate.main(["--dataset", str(other), "--mask", str(tmp_path / "heads.json"), "--no-progress"])
    assert f"warning: the circuit {tmp_path / 'heads.json'} was made on {data}, not {other}" in capsys.readouterr().err


def test_evaluate_on_multiple_choice_rows_equals_one_forward_per_choice(tiny_run, tmp_path):
    import evaluate
    from bench.naive import choice_scores_one_by_one
    from transformers import AutoModelForCausalLM, AutoTokenizer
    rows = json.loads("[" + ",".join((FACTS / "choice" / "test.jsonl").read_text().splitlines()[:12]) + "]")
    path = write(tmp_path / "rows.csv", rows)
    got = evaluate.main(["--dataset", str(path), "--model", str(tiny_run / "model"), "--target-delimiter", ": ",
                         "--log-samples", "--no-progress"])["results"][str(path)]
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "model").eval()
    examples = [Example(((r["prompt"]),) * 4, tuple(": " + c for c in r["choices"]), r["answer"], tuple(r["choices"]))
                for r in rows]
    reference = choice_scores_one_by_one(model, AutoTokenizer.from_pretrained(tiny_run / "model"), examples)
    assert [s["scores"] for s in got["samples"]] == [pytest.approx(r, abs=1e-4) for r in reference]
    right = [max(range(4), key=r.__getitem__) == e.gold for r, e in zip(reference, examples)]
    assert got["acc"] == sum(right) / 12 and got["kind"] == CHOICE


def test_finetune_on_a_folder_evaluates_on_its_test_file(tiny_run, tmp_path):
    import finetune
    (tmp_path / "facts").mkdir()
    write(tmp_path / "facts" / "train.jsonl", CHOICE_ROWS * 5)
    write(tmp_path / "facts" / "test.jsonl", CHOICE_ROWS)
    record = finetune.main(["--method", "lora", "--dataset", str(tmp_path / "facts"), "--model", str(tiny_run / "model"),
                            "--max-steps", "1", "--batch-size", "4", "--out", str(tmp_path / "run"), "--no-progress"])
    assert record["held_out"] == "1 row (10%) carved out of train with seed 0"
    assert (record["eval_split"], record["eval_rows"], record["metric"]) == ("test", 2, "acc")
