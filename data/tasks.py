"""Tasks: what `--dataset` names, where its rows come from and how each row becomes an `Example`.

A task is one of the paper's eight commonsense datasets (below), a file or folder of the user's own rows
(data/user_files.py), or an lm-evaluation-harness task (data/lm_eval_tasks.py); `open_task` picks by name.
Every task turns into a list of `Example`s. Choice i of an example is scored as log P(continuations[i] |
prompts[i]); for almost every task all prompts are the same text and the continuations are delimiter + choice.
WinoGrande's harness style ("partial scoring") is the exception: each option is written into its own prompt and
the shared rest of the sentence is scored. A one-target task (a prompt and the one continuation it should get,
"The capital of France is" -> " Paris") is an example with a single choice, scored by exact match.
"""
import gzip
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from data.files import DataError, read_checked
from headmap.files import first_line

CHOICE, TARGET = "multiple_choice", "target"  # the two kinds of task: what is scored, and how


@dataclass(frozen=True)
class Example:
    prompts: tuple[str, ...]        # one context per choice
    continuations: tuple[str, ...]  # the text scored after each context
    gold: int
    choices: tuple[str, ...]        # what lm-evaluation-harness calls the choices: acc_norm divides by their lengths

    @classmethod
    def with_choices(cls, prompt: str, choices: list[str], gold: int, delimiter: str = " ") -> "Example":
        return cls((prompt,) * len(choices), tuple(delimiter + c for c in choices), gold, tuple(choices))

    @property
    def train_text(self) -> str:
        """Prompt + gold answer: the fine-tuning text (the caller appends EOS)."""
        return self.prompts[self.gold] + self.continuations[self.gold]


class Task:
    """What the scripts need of a task: its kind (CHOICE or TARGET), its splits (the one that trains and locates
    by default, the one that is evaluated), its examples, and where its rows came from (for the output JSON)."""
    name: str
    kind: str = CHOICE
    prompt: str | None = None  # the prompt style, for the eight datasets only: their rows carry no prompt
    train_split: str
    eval_split: str
    splits: tuple[str, ...]

    def check_split(self, split: str | None) -> str:
        """`split` if the task has it (None: the evaluation split), else a one-line error naming the ones it has."""
        split = split or self.eval_split
        if split not in self.splits:
            raise DataError(f"{self.name} has no split {split!r} (it has {', '.join(self.splits)}); pass another --split")
        return split

    def examples(self, split: str | None = None, limit: int | None = None) -> list[Example]:
        raise NotImplementedError

    def source(self, split: str) -> dict:
        raise NotImplementedError


def held_out_rows(task: Task, examples: list[Example], fraction: float, seed: int) -> tuple[list, list, str]:
    """The protocol's held-out set for fine-tuning: the validation split where the task evaluates on another (ARC
    and OpenBookQA evaluate on test), else `fraction` of `examples` (at most 2000 rows), carved out with `seed`.
    Returns (training rows, held-out rows, where the held-out rows came from)."""
    if "validation" in task.splits and task.eval_split not in ("validation", task.train_split):
        return examples, task.examples("validation"), "the validation split"
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(2000, max(1, round(len(examples) * fraction)))
    if n_val >= len(examples):
        raise DataError(f"{task.name} has {len(examples)} training rows: too few to hold {n_val} out; add rows or "
                        "give it a validation split")
    held = set(order[:n_val])
    return ([e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)],
            f"{n_val} row{'s' * (n_val != 1)} ({fraction:.0%}) carved out of {task.train_split} with seed {seed}")


def open_task(name: str, prompt: str | None = None, data_dir: str | None = None, delimiter: str | None = None) -> Task:
    """The task `--dataset name` names: one of the eight, `lm-eval:TASK` (a registered task or a task YAML file), or
    a path (a .jsonl/.jsonl.gz/.json/.csv/.parquet file or a folder of split files). `prompt` and `data_dir` apply
    to the eight only, `delimiter` (between prompt and answer, default " ") to files only: elsewhere they are
    refused, since they would change nothing."""
    if name.startswith("lm-eval:"):
        from data.lm_eval_tasks import LmEvalTask
        refuse_options(name, prompt=prompt, delimiter=delimiter)
        return LmEvalTask(name[len("lm-eval:"):])
    if name in DATASETS:
        refuse_options(name, delimiter=delimiter)
        return Commonsense(name, prompt or "paper", data_dir or default_data_dir())
    if os.path.sep in name or os.path.exists(name) or name.endswith(FILE_FORMATS):
        from data.user_files import FileTask
        refuse_options(name, prompt=prompt)
        return FileTask(name, " " if delimiter is None else delimiter)
    raise DataError(f"unknown dataset {name!r}: pass one of {', '.join(DATASETS)}, a file or folder of your own rows "
                    "(README: Your own task), or lm-eval:TASK")


def refuse_options(name: str, **given) -> None:
    option = {"prompt": "--prompt (the eight datasets' prompt style)",
              "delimiter": "--target-delimiter (between a file's prompts and answers)"}
    for key, value in given.items():
        if value is not None:
            raise DataError(f"{option[key]} does not apply to --dataset {name}; drop it")


# ---------------------------------------------------------------- reading records from files

FILE_FORMATS = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")


def read_records(path: Path, limit: int | None = None):
    """(row number from 1, record) of a JSON Lines file (optionally gzip), a JSON array, a CSV file with a header or
    a Parquet file, streamed: with `limit`, only the first `limit` records are read. A row that is not UTF-8 or not
    JSON raises ValueError naming its row number."""
    name = path.name
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        yield from _numbered((record for batch in batches for record in batch.to_pylist()), limit)
        return
    with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
        if name.endswith(".csv"):
            import csv
            import io
            yield from _numbered(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig", newline="")), limit)
        elif name.endswith(".json") and f.read(4096).lstrip()[:1] == b"[":  # one array; else one record per line
            f.seek(0)
            try:
                records = json.loads(f.read())
            except UnicodeDecodeError:
                raise ValueError("the file is not UTF-8 text; re-save it as UTF-8") from None
            yield from _numbered(records, limit)
        else:
            f.seek(0)
            yield from _numbered((json.loads(line.decode()) for line in f if line.strip()), limit)


def _numbered(records, limit: int | None):
    """Number `records` from 1, stop after `limit`, and name the row that fails to decode."""
    records, number = iter(records), 0
    while limit is None or number < limit:
        try:
            record = next(records)
        except StopIteration:
            return
        except UnicodeDecodeError:
            raise ValueError(f"row {number + 1} is not UTF-8 text; re-save the file as UTF-8") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"row {number + 1} is not JSON ({err.msg})") from None
        number += 1
        yield number, record


# ---------------------------------------------------------------- the eight commonsense datasets

@dataclass(frozen=True)
class Dataset:
    hub_id: str
    hub_config: str | None
    eval_split: str


DATASETS = {
    "boolq": Dataset("google/boolq", None, "validation"),
    "piqa": Dataset("ybisk/piqa", None, "validation"),
    "siqa": Dataset("allenai/social_i_qa", None, "validation"),
    "arc_easy": Dataset("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": Dataset("allenai/ai2_arc", "ARC-Challenge", "test"),
    "openbookqa": Dataset("allenai/openbookqa", "main", "test"),
    "hellaswag": Dataset("Rowan/hellaswag", None, "validation"),
    "winogrande": Dataset("allenai/winogrande", "winogrande_xl", "validation"),
}
PROMPT_STYLES = ("paper", "harness")
LETTERS = "ABCDEFGH"


def check_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


BUNDLED = str(Path(__file__).resolve().parent / "datasets")  # the default source: shipped with the code
HUB = "hub"  # --data-dir hub: the Hugging Face hub, an explicit choice
FORMATS = ("jsonl", "jsonl.gz", "json", "parquet")
BUNDLED_CAVEATS = {
    ("hellaswag", "train"): "the bundled HellaSwag train split is partial: its first 3368 of 39905 rows",
    ("hellaswag", "validation"): "the bundled HellaSwag validation split is lossy: contexts come from `ctx` "
                                 "(ctx_a/ctx_b are missing, WikiHow tags already stripped)",
    ("boolq", "train"): "the bundled BoolQ train split has empty passages: only prompts without the passage "
                        "(--prompt paper) are faithful on it",
}
DATA_DIR_HELP = ("the eight datasets: folder of <dataset>/<split>.jsonl[.gz]|json|parquet files in the HF schema, or "
                 "'hub' for the Hugging Face hub (env HEADMAP_DATA_DIR); default: the bundled copies in data/datasets")
_warned = set()


class Commonsense(Task):
    """One of the paper's eight datasets, in one prompt style, from a data folder (or the hub)."""

    def __init__(self, name: str, prompt: str = "paper", data_dir: str = BUNDLED):
        check_dataset(name)
        if prompt not in PROMPT_STYLES:
            raise DataError(f"unknown prompt style {prompt!r}; use paper or harness")
        self.name, self.prompt, self.data_dir = name, prompt, data_dir
        self.train_split, self.eval_split = "train", DATASETS[name].eval_split
        self.splits = ("train", "validation", "test")  # what the folder has is checked on reading

    def check_split(self, split: str | None) -> str:
        return split or self.eval_split

    def examples(self, split: str | None = None, limit: int | None = None) -> list[Example]:
        return load_examples(self.name, split, self.prompt, self.data_dir, limit)

    def source(self, split: str) -> dict:
        return data_source(self.name, split, self.data_dir)


def default_data_dir() -> str:
    return os.environ.get("HEADMAP_DATA_DIR") or BUNDLED


def data_source(name: str, split: str, data_dir: str) -> dict:
    """Where a split's rows came from, and what is missing from them: for the results JSON."""
    bundled = data_dir != HUB and os.path.abspath(data_dir) == BUNDLED
    source = "bundled" if bundled else data_dir
    return {"source": source, "caveat": BUNDLED_CAVEATS.get((name, split)) if bundled else None}


def load_rows(name: str, split: str, data_dir: str = BUNDLED, limit: int | None = None) -> list[dict]:
    """Rows of one split in the HF schema (the first `limit` only, if given): from
    `data_dir/<name>/<split>.<format>`, or the hub if data_dir is 'hub'."""
    spec = check_dataset(name)
    if data_dir == HUB:
        return _load_hub_rows(name, spec, split)[:limit]
    folder = Path(data_dir) / name
    for ext in FORMATS:
        path = folder / f"{split}.{ext}"
        if path.exists():
            caveat = data_source(name, split, data_dir)["caveat"]
            if caveat and (name, split) not in _warned:  # once per split and process, however often it is read
                _warned.add((name, split))
                print(f"note: {caveat} (data/datasets/SOURCES.md)", file=sys.stderr)
            return read_checked(str(path), "data file", lambda _: [r for _, r in read_records(path, limit)],
                                "fix or replace it (UTF-8 JSON Lines, JSON or Parquet in the Hugging Face schema)")
    others = sorted(p.name for p in folder.glob(f"{split}.*")) if folder.is_dir() else []
    if others:
        raise DataError(f"{folder / others[0]} is not a supported format; convert it to one of "
                        f"{', '.join('.' + e for e in FORMATS)} in the Hugging Face schema")
    have = sorted({p.name.split(".")[0] for ext in FORMATS for p in folder.glob(f"*.{ext}")}) if folder.is_dir() else []
    where = f"available splits: {', '.join(have)}" if have else f"no folder {folder}"
    raise DataError(f"no {split} split of {name} in {data_dir} ({where}); pass another --split or --data-dir")


def _load_hub_rows(name: str, spec: Dataset, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError("--data-dir hub needs the datasets package: pip install datasets") from None
    try:
        return list(datasets.load_dataset(spec.hub_id, spec.hub_config, split=split))
    except ValueError as err:  # datasets raises ValueError for an unknown split
        raise DataError(f"{name} has no split {split!r} on the hub ({first_line(err)}); pass --split") from None
    except Exception as err:  # network or hub failures come in many types
        raise DataError(f"cannot load {name} ({spec.hub_id}) from the Hugging Face hub: {type(err).__name__}; "
                        "drop --data-dir hub to use the bundled copy, or pass a folder") from None


# ---------------------------------------------------------------- prompts

def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow '[title]' becomes a full stop, other tags go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_context(row: dict) -> str:
    if row.get("ctx_a") is not None and row.get("ctx_b") is not None:
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    else:  # the lossy validation copy keeps only ctx
        ctx = row["ctx"]
    return _hellaswag_clean(row["activity_label"] + ": " + ctx)


def _boolq_true(row: dict) -> bool:
    label = row["label"] if "label" in row else row["answer"]  # google/boolq calls it "answer"
    if isinstance(label, str):
        if label.lower() not in ("true", "false", "1", "0"):
            raise KeyError("label")
        return label.lower() in ("true", "1")
    return bool(label)  # bool, or SuperGLUE's int (1 = true)


def _arc_choices(row: dict, stem_field: str) -> tuple[str, list[str], list[str], int]:
    """(question, letters, texts, gold); numeric labels "1".."5" are shown and scored as A..E."""
    labels = [str(x) for x in row["choices"]["label"]]
    letters = [LETTERS[int(x) - 1] if x.isdigit() else x for x in labels]
    key = str(row["answerKey"])
    key = LETTERS[int(key) - 1] if key.isdigit() else key
    return row[stem_field], letters, list(row["choices"]["text"]), letters.index(key)


def _paper_example(name: str, row: dict) -> Example:
    if name == "boolq":
        prompt = f"Please answer the following question with yes or no: {row['question']}?\nAnswer:"
        return Example.with_choices(prompt, ["yes", "no"], 0 if _boolq_true(row) else 1)
    if name == "piqa":
        prompt = (f"Please choose the correct solution to the question: {row['goal']}\n\n"
                  f"(A) {row['sol1']}\n(B) {row['sol2']}\n\nCorrect solution:")
        return Example.with_choices(prompt, ["A", "B"], int(row["label"]))
    if name == "siqa":
        prompt = (f"Please choose the correct answer to the question: {row['context']} {row['question']}\n"
                  f"(A) {row['answerA']} (B) {row['answerB']} (C) {row['answerC']}\nAnswer:")
        return Example.with_choices(prompt, ["A", "B", "C"], int(row["label"]) - 1)
    if name in ("arc_easy", "arc_challenge", "openbookqa"):
        question, letters, texts, gold = _arc_choices(row, "question_stem" if name == "openbookqa" else "question")
        listed = "".join(f" ({letter}) {text}" for letter, text in zip(letters, texts))
        prompt = f"Please choose the correct answer to the question: {question}{listed}\nAnswer:"
        return Example.with_choices(prompt, letters, gold)
    if name == "hellaswag":
        endings = [_hellaswag_clean(e) for e in row["endings"]]
        letters = list(LETTERS[:len(endings)])  # one letter per ending (the original task listed A-E for 4)
        listed = "".join(f" ({letter}) {ending}" for letter, ending in zip(letters, endings))
        prompt = (f"Please choose the correct ending to complete the given sentence: "
                  f"{_hellaswag_context(row)}{listed}\n\nAnswer:")
        return Example.with_choices(prompt, letters, int(row["label"]))
    if name == "winogrande":
        prompt = ("Please choose the correct answer to fill in the blank to complete the given sentence: "
                  f"{row['sentence']}\n(A) {row['option1']} (B) {row['option2']}\nAnswer:")
        return Example.with_choices(prompt, ["A", "B"], int(row["answer"]) - 1)
    raise AssertionError(name)


def _harness_example(name: str, row: dict) -> Example:
    if name == "boolq":
        prompt = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        return Example.with_choices(prompt, ["no", "yes"], 1 if _boolq_true(row) else 0)
    if name == "piqa":
        return Example.with_choices(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))
    if name == "siqa":
        return Example.with_choices(f"Q: {row['context']} {row['question']}\nA:",
                                    [row["answerA"], row["answerB"], row["answerC"]], int(row["label"]) - 1)
    if name in ("arc_easy", "arc_challenge", "openbookqa"):
        question, _, texts, gold = _arc_choices(row, "question_stem" if name == "openbookqa" else "question")
        prompt = question if name == "openbookqa" else f"Question: {question}\nAnswer:"
        return Example.with_choices(prompt, texts, gold)
    if name == "hellaswag":
        return Example.with_choices(_hellaswag_context(row), [_hellaswag_clean(e) for e in row["endings"]],
                                    int(row["label"]))
    if name == "winogrande":
        # partial scoring: the option fills the blank in the context, the rest of the sentence is scored
        sentence = row["sentence"]
        blank = sentence.index("_")
        rest = " " + sentence[blank + 1:].strip()
        contexts = tuple(sentence[:blank] + o for o in (row["option1"], row["option2"]))
        # the harness's choices are the option-filled contexts, so acc_norm divides by their lengths
        return Example(contexts, (rest, rest), int(row["answer"]) - 1, contexts)
    raise AssertionError(name)


def make_example(name: str, row: dict, style: str = "paper") -> Example:
    build = _paper_example if style == "paper" else _harness_example
    example = build(name, row)
    if not 0 <= example.gold < len(example.continuations):
        raise ValueError(f"gold answer {example.gold} out of range")
    return example


def load_examples(name: str, split: str | None = None, style: str = "paper", data_dir: str = BUNDLED,
                  limit: int | None = None) -> list[Example]:
    """Examples of one split (default: the protocol's evaluation split), first `limit` rows only if given."""
    spec = check_dataset(name)
    if style not in PROMPT_STYLES:
        raise DataError(f"unknown prompt style {style!r}; use paper or harness")
    split = split or spec.eval_split
    rows = load_rows(name, split, data_dir, limit)
    if not rows:
        raise DataError(f"{name} split {split} in {data_dir} has no rows; check the file or --data-dir")
    examples = []
    for i, row in enumerate(rows):
        try:
            examples.append(make_example(name, row, style))
        except (KeyError, ValueError, TypeError, IndexError) as err:
            raise DataError(f"{name} {split} row {i} is malformed ({type(err).__name__}: {err}); "
                            "check that the file uses the Hugging Face schema") from None
    return examples
