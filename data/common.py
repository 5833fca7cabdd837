"""What every task is, whichever kind: the two kinds of task, an Example (the text scored for each choice), the
Task interface the scripts use, which split a task trains and evaluates on, and the held-out rows for fine-tuning.

Choice i of an example is scored as log P(continuations[i] | prompts[i]); for almost every task all prompts are the
same text and the continuations are delimiter + choice. WinoGrande's harness style ("partial scoring") is the
exception: each option is written into its own prompt and the shared rest of the sentence is scored. A one-target
task (a prompt and the one continuation it should get, "The capital of France is" -> " Paris") is an example with a
single choice, scored by exact match.
"""
import random
import sys
from dataclasses import dataclass

from data.files import DataError

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


def standard_splits(splits: tuple[str, ...]) -> tuple[str, str]:
    """(train split, evaluation split) of a task with these splits: it evaluates on test, else validation, else
    train, and trains on train, else on what it evaluates on."""
    evaluate = "test" if "test" in splits else "validation" if "validation" in splits else "train"
    return ("train" if "train" in splits else evaluate), evaluate


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


@dataclass(frozen=True)
class FinetuneRows:
    """The run's rows: trained on, held out for the validation loss, scored for the accuracy."""
    train: list
    val: list
    eval: list
    eval_split: str  # where the accuracy rows come from
    held_out: str  # where the held-out rows come from
    source: dict  # the training rows as read now (a file: path, row count, sha256)


def finetune_rows(task: Task, train_limit: int | None, val_fraction: float, val_limit: int | None,
                  eval_limit: int | None, seed: int) -> FinetuneRows:
    """The protocol's rows for fine-tuning: the first `train_limit` training rows less the held-out ones
    (held_out_rows, capped at `val_limit`), and the first `eval_limit` rows of the evaluation split (of the held-out
    rows where the task has no evaluation split of its own). Says on stdout where they come from."""
    examples = task.examples(task.train_split, train_limit)
    source = task.source(task.train_split)  # the rows as read now, not as the file may be when training ends
    train, val, held_out = held_out_rows(task, examples, val_fraction, seed)
    val = val[:val_limit]
    print(f"{len(train)} training rows of {task.train_split}; held out: {held_out}")
    if task.eval_split == task.train_split:  # one file (or only a train split): the held-out rows are all it has
        print(f"{task.name} has no evaluation split of its own: the accuracy is measured on the held-out rows")
        return FinetuneRows(train, val, val[:eval_limit], "held-out rows", held_out, source)
    return FinetuneRows(train, val, task.examples(task.eval_split, eval_limit), task.eval_split, held_out, source)


@dataclass(frozen=True)
class LocateRows:
    """locate's rows: the pool D is drawn from, and the rows its circuit is validated on (None: no validation)."""
    pool: list
    split: str
    source: dict  # the pool's rows as read now (a file: path, row count, sha256)
    val: list | None
    val_split: str
    val_source: dict | None


def locate_rows(task: Task, split: str, pool: int | None, samples: int, val_split: str,
                validate_limit: int | None, validate: bool) -> LocateRows:
    """The first `pool` rows of `split` (at least `samples` of them), and the first `validate_limit` rows of
    `val_split` where `validate`; each source read once (a file is hashed once). A note on stderr where the two are
    one split."""
    examples = task.examples(split, pool)
    if samples > len(examples):
        more = f" or a --pool above {pool}" if pool == len(examples) else ""
        raise DataError(f"--samples {samples} asks for more samples than the pool holds ({len(examples)} rows of "
                        f"{task.name} {split}); pass --samples {len(examples)} or fewer{more}")
    val = task.examples(val_split, validate_limit) if validate else None
    source = task.source(split)  # the rows as read now, not as the file may be when the search ends
    val_source = source if val_split == split or val is None else task.source(val_split)
    if val is not None and split == val_split:
        print(f"note: the samples and the validation both come from {split} of {task.name}: the validation includes "
              "the samples", file=sys.stderr)
    return LocateRows(examples, split, source, val, val_split, val_source)
