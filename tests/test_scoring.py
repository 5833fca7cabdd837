"""Batched scoring (one forward per example where possible) equals one stock forward pass per choice."""
import logging

import pytest
from transformers.utils import logging as transformers_logging

from data.scoring import accuracy, build_prompts, score_examples
from data.common import Example
from data.commonsense import load_examples
from bench.naive import choice_scores_one_by_one

TINY_EXAMPLES = [
    Example.with_choices("Pick: (A) red (B) blue\nAnswer:", ["A", "B"], 1),            # single-token choices
    Example.with_choices("Which is cold?", ["ice cream", "fire", "sun"], 0),            # multi-token choices
    Example.with_choices("Q: a much longer question here, padded against the rest?\nA:", ["x", "y", "z"], 2),  # fast
    Example(("Ann beat Bo because Ann", "Ann beat Bo because Bo"), (" was fast.", " was fast."), 1,
            ("Ann beat Bo because Ann", "Ann beat Bo because Bo")),
]


def flat(scores):
    return [v for row in scores for v in row]


def test_each_prompt_runs_once_for_all_its_choices(tiny):
    _, tok = tiny
    prompts, _ = build_prompts(tok, TINY_EXAMPLES)  # WinoGrande's two option-filled contexts are two prompts
    assert [len(p.continuations) for p in prompts] == [2, 3, 3, 1, 1]
    assert [[len(cont) for _, _, cont in p.continuations] for p in prompts][:2] == [[1, 1], [8, 4, 3]]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_tiny_llama_scores_equal_one_forward_per_choice(tiny, batch_size):
    model, tok = tiny
    fast = score_examples(model, tok, TINY_EXAMPLES, batch_size=batch_size, progress=False)
    slow = choice_scores_one_by_one(model, tok, TINY_EXAMPLES)
    assert flat(fast) == pytest.approx(flat(slow), abs=1e-4)


def test_scoring_raises_no_transformers_deprecation_warning(tiny):
    """Scoring looks the prompt's cache up by the name the model uses, and only when a continuation needs it."""
    model, tok = tiny
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    transformers_logging.warning_once.cache_clear()  # a warning given earlier in the session would be silent
    logging.getLogger("transformers").addHandler(handler)
    try:
        for examples in (TINY_EXAMPLES[:1], TINY_EXAMPLES):  # one-token answers only (no cache kept), then all
            score_examples(model, tok, examples, batch_size=4, progress=False)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [m for m in said if "deprecated" in m]


def test_accuracy_and_length_normalisation():
    examples = [Example.with_choices("p", ["a", "bbbb"], 1), Example.with_choices("p", ["a", "bb"], 0)]
    metrics = accuracy(examples, [[-1.0, -2.0], [-3.0, -4.0]])
    assert metrics["predictions"] == [0, 0] and metrics["acc"] == 0.5
    assert metrics["predictions_norm"] == [1, 1] and metrics["acc_norm"] == 0.5  # -2/4 > -1/1 ; -4/2 > -3/1


def test_winogrande_acc_norm_divides_by_the_option_filled_context_as_lm_eval_does():
    from data.commonsense import make_example
    rows = [{"sentence": "Ann beat Bo because _ was fast.", "option1": "Annabelle", "option2": "Bo", "answer": "1"},
            {"sentence": "The trophy didn't fit in the suitcase because _ was too big.", "option1": "the trophy",
             "option2": "the suitcase", "answer": "2"}]
    examples = [make_example("winogrande", row, "harness") for row in rows]
    scores = [[-3.0, -2.5], [-12.0, -12.4]]
    # by hand: the choices are "Ann beat Bo because Annabelle" (29 characters) and "... Bo" (22), so -3/29 = -0.1034
    # beats -2.5/22 = -0.1136; then 56 and 58 characters: -12/56 = -0.2143 loses to -12.4/58 = -0.2138.
    # Dividing by the shared continuation instead would leave acc_norm equal to acc.
    assert [len(c) for ex in examples for c in ex.choices] == [29, 22, 56, 58]
    metrics = accuracy(examples, scores)
    assert metrics["predictions"] == [1, 0] and metrics["predictions_norm"] == [0, 1]
    assert metrics["acc"] == 0.0 and metrics["acc_norm"] == 1.0


@pytest.mark.parametrize("name,style", [("arc_easy", "paper"), ("piqa", "harness"), ("winogrande", "harness")])
def test_real_model_predictions_equal_one_forward_per_choice(smollm2, bundled_data, name, style):
    model, tok = smollm2
    # paper prompts are long (every choice listed) and need one forward per choice here: 8 rows cover the one-token
    # fast path as 20 did
    examples = load_examples(name, None, style, bundled_data, limit=12 if style == "harness" else 8)
    fast = score_examples(model, tok, examples, batch_size=8, progress=False)
    slow = choice_scores_one_by_one(model, tok, examples)
    assert flat(fast) == pytest.approx(flat(slow), abs=2e-3)
    assert accuracy(examples, fast)["predictions"] == accuracy(examples, slow)["predictions"]
