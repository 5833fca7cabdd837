"""The paper's eight commonsense datasets: where their rows come from (the bundled copies, a folder in the Hugging
Face schema, or the hub) and their two prompt styles, the paper's letter prompts and lm-evaluation-harness's own."""
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from data.common import Example, Task
from data.files import DataError, read_records
from headmap.errors import error_summary
from headmap.files import read_input


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
DEFAULT_PROMPT = "paper"  # the paper's letter prompts, unless --prompt (or what a circuit or adapter recorded) says
LETTERS = "ABCDEFGH"


def check_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}{did_you_mean(name)}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def did_you_mean(name: str) -> str:
    """' (did you mean arc_easy?)' for a near miss of one of the eight names (any case, - or space for _), else ''."""
    import difflib
    key = name.lower().replace("-", "_").replace(" ", "_")
    close = [key] if key in DATASETS else difflib.get_close_matches(key, DATASETS, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


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

    def __init__(self, name: str, prompt: str = DEFAULT_PROMPT, data_dir: str = BUNDLED):
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
            return read_input(str(path), "data file", lambda _: [r for _, r in read_records(path, limit)],
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
        raise DataError(f"{name} has no split {split!r} on the hub ({error_summary(err)}); pass --split") from None
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


def make_example(name: str, row: dict, style: str = DEFAULT_PROMPT) -> Example:
    build = _paper_example if style == "paper" else _harness_example
    example = build(name, row)
    if not 0 <= example.gold < len(example.continuations):
        raise ValueError(f"gold answer {example.gold} out of range")
    return example


def load_examples(name: str, split: str | None = None, style: str = DEFAULT_PROMPT, data_dir: str = BUNDLED,
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
