"""Batched scoring (one forward per example where possible) equals one stock forward pass per choice."""
import pytest

from data import accuracy, build_rows, load_examples, score_examples
from data.tasks import Example
from tests.reference import choice_scores_one_by_one

TINY_EXAMPLES = [
    Example.with_choices("Pick: (A) red (B) blue\nAnswer:", ["A", "B"], 1),            # single-token choices
    Example.with_choices("Which is cold?", ["ice cream", "fire", "sun"], 0),            # multi-token choices
    Example.with_choices("Q: a much longer question here, padded against the rest?\nA:", ["x", "y", "z"], 2),  # fast
    Example(("Ann beat Bo because Ann", "Ann beat Bo because Bo"), (" was fast.", " was fast."), 1),
]


def flat(scores):
    return [v for row in scores for v in row]


def test_fast_path_is_taken_only_for_single_token_shared_prompts(tiny):
    _, tok = tiny
    rows = build_rows(tok, TINY_EXAMPLES)
    assert [len(r.spans) for r in rows] == [2, 1, 1, 1, 3, 1, 1]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_tiny_llama_scores_equal_one_forward_per_choice(tiny, batch_size):
    model, tok = tiny
    fast = score_examples(model, tok, TINY_EXAMPLES, batch_size=batch_size, progress=False)
    slow = choice_scores_one_by_one(model, tok, TINY_EXAMPLES)
    assert flat(fast) == pytest.approx(flat(slow), abs=1e-4)


def test_accuracy_and_length_normalisation():
    examples = [Example.with_choices("p", ["a", "bbbb"], 1), Example.with_choices("p", ["a", "bb"], 0)]
    metrics = accuracy(examples, [[-1.0, -2.0], [-3.0, -4.0]])
    assert metrics["predictions"] == [0, 0] and metrics["acc"] == 0.5
    assert metrics["predictions_norm"] == [1, 1] and metrics["acc_norm"] == 0.5  # -2/4 > -1/1 ; -4/2 > -3/1


@pytest.mark.parametrize("name,style", [("arc_easy", "paper"), ("piqa", "harness"), ("winogrande", "harness")])
def test_real_model_predictions_equal_one_forward_per_choice(smollm2, bundled_data, name, style):
    model, tok = smollm2
    examples = load_examples(name, None, style, bundled_data, limit=12 if style == "harness" else 30)
    fast = score_examples(model, tok, examples, batch_size=8, progress=False)
    slow = choice_scores_one_by_one(model, tok, examples)
    assert flat(fast) == pytest.approx(flat(slow), abs=2e-3)
    assert accuracy(examples, fast)["predictions"] == accuracy(examples, slow)["predictions"]
