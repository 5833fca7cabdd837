"""Every prompt template pinned against a literal, hand-written expected prompt."""
import pytest

from data.common import Example
from data.commonsense import make_example

ROWS = {
    "boolq": {"question": "is the sky blue", "passage": "The sky is blue.", "label": True},
    "piqa": {"goal": "Open a jar", "sol1": "Twist the lid", "sol2": "Bite the lid", "label": 0},
    "siqa": {"context": "Sam ate.", "question": "How is Sam?", "answerA": "hungry", "answerB": "full",
             "answerC": "sad", "label": "2"},
    "arc_easy": {"question": "What is ice?", "choices": {"text": ["solid", "gas"], "label": ["A", "B"]},
                 "answerKey": "A"},
    "arc_challenge": {"question": "Pick one.", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]},
                      "answerKey": "3"},
    "openbookqa": {"question_stem": "The sun is", "choices": {"text": ["hot", "cold"], "label": ["A", "B"]},
                   "answerKey": "A"},
    "hellaswag": {"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he",
                  "ctx": "A man mixes flour. he", "endings": ["bakes it [title] Done.", "eats  it."], "label": 0},
    "winogrande": {"sentence": "Ann beat Bo because _ was fast.", "option1": "Ann", "option2": "Bo", "answer": "1"},
}

PAPER = {
    "boolq": Example.with_choices(
        "Please answer the following question with yes or no: is the sky blue?\nAnswer:", ["yes", "no"], 0),
    "piqa": Example.with_choices(
        "Please choose the correct solution to the question: Open a jar\n\n(A) Twist the lid\n(B) Bite the lid"
        "\n\nCorrect solution:", ["A", "B"], 0),
    "siqa": Example.with_choices(
        "Please choose the correct answer to the question: Sam ate. How is Sam?\n(A) hungry (B) full (C) sad"
        "\nAnswer:", ["A", "B", "C"], 1),
    "arc_easy": Example.with_choices(
        "Please choose the correct answer to the question: What is ice? (A) solid (B) gas\nAnswer:", ["A", "B"], 0),
    "arc_challenge": Example.with_choices(
        "Please choose the correct answer to the question: Pick one. (A) x (B) y (C) z\nAnswer:",
        ["A", "B", "C"], 2),
    "openbookqa": Example.with_choices(
        "Please choose the correct answer to the question: The sun is (A) hot (B) cold\nAnswer:", ["A", "B"], 0),
    "hellaswag": Example.with_choices(
        "Please choose the correct ending to complete the given sentence: Baking: A man mixes flour. He"
        " (A) bakes it. Done. (B) eats it.\n\nAnswer:", ["A", "B"], 0),
    "winogrande": Example.with_choices(
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        "Ann beat Bo because _ was fast.\n(A) Ann (B) Bo\nAnswer:", ["A", "B"], 0),
}

HARNESS = {
    "boolq": Example.with_choices("The sky is blue.\nQuestion: is the sky blue?\nAnswer:", ["no", "yes"], 1),
    "piqa": Example.with_choices("Question: Open a jar\nAnswer:", ["Twist the lid", "Bite the lid"], 0),
    "siqa": Example.with_choices("Q: Sam ate. How is Sam?\nA:", ["hungry", "full", "sad"], 1),
    "arc_easy": Example.with_choices("Question: What is ice?\nAnswer:", ["solid", "gas"], 0),
    "arc_challenge": Example.with_choices("Question: Pick one.\nAnswer:", ["x", "y", "z"], 2),
    "openbookqa": Example.with_choices("The sun is", ["hot", "cold"], 0),
    "hellaswag": Example.with_choices("Baking: A man mixes flour. He", ["bakes it. Done.", "eats it."], 0),
    "winogrande": Example(("Ann beat Bo because Ann", "Ann beat Bo because Bo"), (" was fast.", " was fast."), 0,
                          ("Ann beat Bo because Ann", "Ann beat Bo because Bo")),
}


@pytest.mark.parametrize("name", ROWS)
def test_paper_prompt(name):
    assert make_example(name, ROWS[name], "paper") == PAPER[name]


@pytest.mark.parametrize("name", ROWS)
def test_harness_prompt(name):
    assert make_example(name, ROWS[name], "harness") == HARNESS[name]


def test_train_text_is_prompt_plus_gold_answer():
    assert make_example("boolq", ROWS["boolq"]).train_text == (
        "Please answer the following question with yes or no: is the sky blue?\nAnswer: yes")
    assert make_example("winogrande", ROWS["winogrande"], "harness").train_text == "Ann beat Bo because Ann was fast."


@pytest.mark.parametrize("label,gold_paper", [(False, 1), ("false", 1), ("True", 0), (1, 0), (0, 1)])
def test_boolq_labels_bool_string_or_int(label, gold_paper):
    row = {"question": "q", "passage": "", "label": label}
    assert make_example("boolq", row).gold == gold_paper
    assert make_example("boolq", {"question": "q", "passage": "", "answer": label}).gold == gold_paper


def test_arc_five_numeric_choices_and_hellaswag_ctx_only():
    row = {"question": "Q", "choices": {"text": list("vwxyz"), "label": list("12345")}, "answerKey": "5"}
    ex = make_example("arc_easy", row)
    assert ex.continuations == (" A", " B", " C", " D", " E") and ex.gold == 4
    lossy = {"activity_label": "Roof", "ctx": "A man sits. he", "ctx_a": None, "ctx_b": None,
             "endings": ["a", "b", "c", "d"], "label": 3}
    ex = make_example("hellaswag", lossy)
    assert ex.prompts[0].startswith("Please choose the correct ending to complete the given sentence: Roof: A man sits. he (A) a")
    assert ex.continuations == (" A", " B", " C", " D") and ex.gold == 3
