"""Answer normalisation and the evaluation metrics, against hand-computed values (REFERENCE.md section 8)."""

from __future__ import annotations

import pytest

from llava_core.metrics import METRICS, exact_match, normalize_answer, pope_metrics, vqa_accuracy, yes_no


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Red", "red"),  # case
        ("  BLUE\t", "blue"),  # case + whitespace
        ("top-left", "top left"),  # punctuation -> space
        ("yes!", "yes"),
        ("Circle?", "circle"),
        ("(square)", "square"),
        ("The Red Circle.", "red circle"),  # articles + period
        ("a cat, an apple", "cat apple"),
        ("the", ""),
        ("Two", "2"),  # number words -> digits
        ("ten", "10"),
        ("zero", "0"),
        ("none", "0"),
        ("three  red\nshapes", "3 red shapes"),  # newlines and runs of spaces fold
        ("3.5", "3.5"),  # decimals kept
        ("0.25", "0.25"),
        ("pi is 3.14", "pi is 3.14"),
        ("end. start", "end start"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_trailing_period_after_number_is_removed():
    assert normalize_answer("2.") == "2"
    assert exact_match("2.", ["2"]) == 1.0


def test_exact_match():
    assert exact_match("Red.", ["red"]) == 1.0
    assert exact_match("two", ["2"]) == 1.0
    assert exact_match("The circle", ["circle", "square"]) == 1.0
    assert exact_match("square", ["circle"]) == 0.0
    assert exact_match("red circle", ["red"]) == 0.0  # whole answer, not a substring
    assert exact_match("anything", []) == 0.0
    assert isinstance(exact_match("a", ["a"]), float)


@pytest.mark.parametrize(
    "pred, answers, expected",
    [
        ("cat", ["dog", "dog", "bird"], 0.0),
        ("cat", ["Cat", "dog", "dog"], 1 / 3),  # one match (case-insensitive)
        ("2", ["two", "2.", "3"], 2 / 3),  # "two" -> "2" and "2." -> "2"
        ("cat", ["cat", "the cat", "dog", "dog"], 2 / 3),  # "the cat" -> "cat"
        ("cat", ["cat", "cat", "cat"], 1.0),  # exactly 3 matches
        ("cat", ["cat"] * 7 + ["dog"] * 3, 1.0),  # more than 3 matches is capped at 1
    ],
)
def test_vqa_accuracy(pred, answers, expected):
    assert vqa_accuracy(pred, answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("NO, it is a square", "no"),
        ("There is not a circle", "no"),
        ("There is a circle.", "yes"),
        ("nothing", "yes"),  # "no" must be a whole word
        ("Notably yes", "yes"),
        ("", "yes"),
    ],
)
def test_yes_no(text, expected):
    assert yes_no(text) == expected


def test_pope_metrics_hand_computed():
    preds = ["Yes", "yes.", "No", "no", "Yes, there is", "There is not", "yes", "No."]
    gts = ["yes", "yes", "yes", "no", "no", "no", "yes", "no"]
    # parsed:  y     y      n     n     y      n      y     n
    # vs gt:   TP    TP     FN    TN    FP     TN     TP    TN
    # TP=3 FP=1 FN=1 TN=3, n=8
    # accuracy  = (3+3)/8 = 0.75
    # precision = 3/(3+1) = 0.75
    # recall    = 3/(3+1) = 0.75
    # f1        = 2*0.75*0.75/1.5 = 0.75
    # yes_ratio = (3+1)/8 = 0.5
    m = pope_metrics(preds, gts)
    assert m == pytest.approx({"accuracy": 0.75, "precision": 0.75, "recall": 0.75, "f1": 0.75, "yes_ratio": 0.5})


def test_pope_metrics_asymmetric():
    preds = ["yes", "yes", "yes", "yes", "no"]
    gts = ["yes", "no", "no", "yes", "yes"]
    # parsed y y y y n ; TP=2 (0,3) FP=2 (1,2) FN=1 (4) TN=0
    # accuracy = 2/5 = 0.4 ; precision = 2/4 = 0.5 ; recall = 2/3 ; f1 = 2*0.5*(2/3)/(0.5+2/3) = 4/7
    # yes_ratio = 4/5 = 0.8
    m = pope_metrics(preds, gts)
    assert m["accuracy"] == pytest.approx(0.4)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["yes_ratio"] == pytest.approx(0.8)


def test_pope_metrics_all_no_predictions():
    # no "yes" predicted: precision, recall and f1 are 0 (no division by zero)
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert m == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}


def test_pope_metrics_length_mismatch():
    with pytest.raises(ValueError):
        pope_metrics(["yes"], ["yes", "no"])


def test_metric_registry():
    assert set(METRICS) == {"exact_match", "vqa_accuracy", "pope"}
    assert METRICS["exact_match"](["red", "Two", "x"], [["red"], ["2"], ["y"]]) == {"accuracy": pytest.approx(2 / 3)}
    assert METRICS["vqa_accuracy"](["cat"], [["cat", "dog", "dog"]]) == {"accuracy": pytest.approx(1 / 3)}
    assert METRICS["exact_match"]([], []) == {"accuracy": 0.0}
    pope = METRICS["pope"](["yes", "no"], [["yes"], ["yes"]])
    # TP=1 FN=1: accuracy 0.5, precision 1, recall 0.5, f1 2/3, yes_ratio 0.5
    assert pope == pytest.approx({"accuracy": 0.5, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "yes_ratio": 0.5})
