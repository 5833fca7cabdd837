"""`--dataset lm-eval:TASK`: any multiple-choice task of lm-evaluation-harness, as lm-eval itself builds it.

TASK is a registered task name (`arc_easy`, `mmlu_anatomy`, ...) or the path of a task YAML file (which may
`include:` a registered one and swap its data for local files: that is how a task runs offline). The examples
come from lm-eval's own task object: its zero-shot context for each document (`fewshot_context`, with the task's
description) and its requests (`construct_requests`: `doc_to_choice`, `doc_to_target`, `target_delimiter`, and
one context per choice for multiple-input tasks such as WinoGrande); the gold index and the choice lengths that
acc_norm divides by are read as lm-eval's `process_results` reads them. So acc and acc_norm are lm-eval's.
lm-eval is an optional dependency: only this module imports it.
"""
import difflib
import sys

from data.common import CHOICE, Example, Task, standard_splits
from data.files import DataError
from headmap.errors import error_summary

SPLIT_DOCS = {"train": "training_docs", "validation": "validation_docs", "test": "test_docs"}


def lm_eval_module():
    try:
        import lm_eval
    except ImportError:
        raise DataError("--dataset lm-eval:TASK needs lm-evaluation-harness: pip install lm-eval") from None
    return lm_eval


class LmEvalTask(Task):
    def __init__(self, spec: str):
        lm_eval = lm_eval_module()
        from lm_eval.tasks import TaskManager
        if not spec:
            raise DataError("--dataset lm-eval: names no task; pass lm-eval:TASK (a task name or a task YAML file)")
        is_file = spec.endswith((".yaml", ".yml"))
        manager = TaskManager(include_defaults=not is_file)  # a file needs no index of the 14,000 built-in tasks
        if not is_file and spec not in manager.all_tasks:
            close = difflib.get_close_matches(spec, manager.all_subtasks, n=3)
            raise DataError(f"lm-eval has no task {spec!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + "; `lm-eval ls tasks` lists them, or pass a task YAML file")
        if not is_file and spec in manager.all_groups + manager.all_tags:
            raise DataError(f"lm-eval:{spec} is a group of tasks; pass one of its tasks")
        try:
            loaded = manager.load([spec])["tasks"]
        except Exception as err:  # the task's data cannot be fetched (offline), a broken YAML, ...
            detail = error_summary(err, 200)
            raise DataError(f"cannot load lm-eval task {spec} ({type(err).__name__}: {detail}); offline, point a task "
                            "YAML at local files (README: Your own task)") from None
        if len(loaded) != 1:
            raise DataError(f"lm-eval:{spec} holds {len(loaded)} tasks; pass one of them: {', '.join(loaded)}")
        (task_name, self.task), = loaded.items()
        if self.task.OUTPUT_TYPE != "multiple_choice":
            raise DataError(f"lm-eval task {task_name} is a {self.task.OUTPUT_TYPE} task; HeadMap scores answers by "
                            "log-likelihood, so only multiple_choice tasks can be used")
        self.name, self.kind, self.task_name = f"lm-eval:{spec}", CHOICE, task_name
        self.version = (self.task.config.metadata or {}).get("version", self.task.VERSION)
        self.splits = tuple(s for s, docs in SPLIT_DOCS.items() if getattr(self.task, "has_" + docs)())
        if not self.splits:
            raise DataError(f"lm-eval task {task_name} has no documents")
        self.train_split, self.eval_split = standard_splits(self.splits)
        self.lm_eval_version = lm_eval.__version__
        if self.task.config.num_fewshot:
            print(f"note: lm-eval's {task_name} asks for {self.task.config.num_fewshot}-shot prompts; HeadMap scores "
                  "zero-shot", file=sys.stderr)

    def examples(self, split: str | None = None, limit: int | None = None) -> list[Example]:
        split = self.check_split(split)
        docs = getattr(self.task, SPLIT_DOCS[split])()
        examples = []
        for i, doc in enumerate(docs):
            if limit is not None and i >= limit:
                break
            try:
                examples.append(self.example(doc))
            except (KeyError, ValueError, TypeError, IndexError) as err:
                raise DataError(f"lm-eval task {self.task_name}, {split} document {i}: {type(err).__name__}: "
                                f"{err}") from None
        if not examples:
            raise DataError(f"lm-eval task {self.task_name} has no {split} documents")
        return examples

    def example(self, doc: dict) -> Example:
        task = self.task
        context = task.fewshot_context(doc, 0)
        requests = task.construct_requests(doc, context, metadata=(self.task_name, 0, 1))
        choices = task.doc_to_choice(doc)
        pairs = [r.arguments[:2] for r in requests][:len(choices)]  # beyond: acc_mutual_info's unconditional pairs
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        if isinstance(gold, str):
            gold = choices.index(gold) if gold in choices else -1
        if isinstance(gold, list):
            raise ValueError("the document has several right answers, which acc cannot score as one index")
        if not 0 <= gold < len(choices):
            raise ValueError(f"the gold answer {gold} is not one of its {len(choices)} choices")
        return Example(tuple(c for c, _ in pairs), tuple(t for _, t in pairs), gold, tuple(choices))

    def source(self, split: str) -> dict:
        config = self.task.config
        return {"source": "lm-eval", "task": self.task_name, "version": self.version, "lm_eval": self.lm_eval_version,
                "dataset_path": config.dataset_path, "dataset_name": config.dataset_name,
                "config_source": (config.metadata or {}).get("config_source")}
