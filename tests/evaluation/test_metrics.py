"""The metrics against worked examples of the benchmarks' official definitions (docs/evaluation.md)."""

from __future__ import annotations

import pytest

from llava_core.evaluation.metrics import (
    METRICS,
    anls,
    choice_letter,
    exact_match,
    levenshtein,
    mc_accuracy,
    pope_metrics,
    process_vqa_answer,
    relaxed_match,
    vqa_accuracy,
    yes_no,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Red", "red"),  # case
        ("  BLUE\t", "blue"),  # case + whitespace
        ("top-left", "top left"),  # punctuation inside a word -> a space
        ("yes !", "yes"),  # punctuation next to a space -> removed
        ("yes!", "yes"),  # ! closing the answer: no space after it, so a space, then folded
        ("Circle?", "circle"),  # ? always goes
        ("(square)", "square"),
        ("The Red Circle.", "red circle"),  # articles + a final period
        ("a cat, an apple", "cat apple"),  # , always goes
        ("the", ""),
        ("Two", "2"),  # number words -> digits
        ("ten", "10"),
        ("none", "0"),
        ("three  red\nshapes", "3 red shapes"),  # newlines and runs of spaces fold
        ("3.5", "3.5"),  # a period before a digit stays
        ("2.", "2"),
        ("end. start", "end start"),
        ("dont", "don't"),  # contractions restored
        ("Dont know", "don't know"),
        ("youre", "you're"),
        ("couldnt've", "couldn't've"),  # one of two apostrophes missing
        ("couldn'tve", "couldn't've"),
        ("twas", "'twas"),
        ("don't", "don't"),  # the apostrophe is no punctuation here
        ("man's hat", "man 's hat"),  # 's is split off
        ("1,000", "1000"),
        ("ice-cream; cone", "ice cream cone"),  # `;` next to a space goes, `-` inside a word is a space
    ],
)
def test_vqa_answer_processing(text, expected):
    assert process_vqa_answer(text) == expected


@pytest.mark.parametrize(
    "matching, expected",
    [
        (0, 0.0),
        (1, 0.3),  # nine subsets with 1 match (1/3), one with 0: 9 x 1/3 / 10
        (2, 0.6),  # eight subsets with 2 matches (2/3), two with 1 (1/3): (16/3 + 2/3) / 10
        (3, 0.9),  # seven subsets with 3 matches (1), three with 2 (2/3): (7 + 2) / 10 -- not 1.0
        (4, 1.0),  # every subset keeps at least 3 matches
        (7, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_is_the_leave_one_out_mean_over_ten_answers(matching, expected):
    answers = ["cat"] * matching + ["dog"] * (10 - matching)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_processes_prediction_and_answers_alike():
    assert vqa_accuracy("Dont know.", ["don't know"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("two", ["2", "2.", "two", "Two"] + ["3"] * 6) == 1.0
    assert vqa_accuracy("the cat", ["a cat", "cat", "Cat!", "dog"] + ["x"] * 6) == pytest.approx(0.9)  # 3 match
    assert vqa_accuracy("top left", ["top-left"] * 2 + ["left"] * 8) == pytest.approx(0.6)
    # fewer than ten answers: the same leave-one-out mean over them (one answer alone can never be matched)
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    assert vqa_accuracy("cat", ["cat"]) == 0.0
    assert vqa_accuracy("cat", []) == 0.0


def test_exact_match_is_gqas():
    """LLaVA's convert_gqa_for_eval (trailing periods cut, lower case), then GQA's string comparison."""
    assert exact_match("Red.", ["red"]) == 1.0
    assert exact_match("Yes", ["yes"]) == 1.0
    assert exact_match("traffic light", ["traffic light", "car"]) == 1.0
    assert exact_match("two", ["2"]) == 0.0  # no number words
    assert exact_match("the circle", ["circle"]) == 0.0  # no articles dropped
    assert exact_match("red circle", ["red"]) == 0.0  # whole answer, not a substring
    assert exact_match("anything", []) == 0.0
    assert isinstance(exact_match("a", ["a"]), float)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("No, it is a square", "no"),  # commas out before splitting
        ("There is not a circle", "no"),
        ("There is a circle.", "yes"),
        ("Yes. There is no other shape", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # the official reading: only `No`, `no` and `not` are negative words
        ("nothing", "yes"),  # whole words
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
    assert set(METRICS) == {"exact_match", "vqa_accuracy", "anls", "relaxed_accuracy", "mc_accuracy", "pope"}
    # every metric has the headline `accuracy` the report averages
    assert METRICS["anls"](["helo", "x"], [["hello"], ["x"]]) == pytest.approx({"accuracy": 0.9, "anls": 0.9})
    assert METRICS["relaxed_accuracy"](["104", "96", "90"], [["100"], ["100"], ["100"]]) == pytest.approx(
        {"accuracy": 2 / 3}
    )
    assert METRICS["mc_accuracy"](["A", "no idea"], [["A"], ["B"]]) == pytest.approx({"accuracy": 0.5, "unparsed": 0.5})
    assert METRICS["exact_match"](["red", "2.", "x"], [["red"], ["2"], ["y"]]) == {"accuracy": pytest.approx(2 / 3)}
    assert METRICS["vqa_accuracy"](["cat", "dog"], [["cat"] * 3 + ["x"] * 7, ["dog"] * 10]) == {
        "accuracy": pytest.approx((0.9 + 1.0) / 2)
    }
    assert METRICS["exact_match"]([], []) == {"accuracy": 0.0}
    pope = METRICS["pope"](["yes", "no"], [["yes"], ["yes"]])
    # TP=1 FN=1: accuracy 0.5, precision 1, recall 0.5, f1 2/3, yes_ratio 0.5
    assert pope == pytest.approx({"accuracy": 0.5, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "yes_ratio": 0.5})


@pytest.mark.parametrize(
    "a, b, expected", [("kitten", "sitting", 3), ("", "abc", 3), ("flaw", "lawn", 2), ("ab", "ab", 0)]
)
def test_levenshtein(a, b, expected):
    assert levenshtein(a, b) == expected == levenshtein(b, a)


@pytest.mark.parametrize(
    "pred, answers, expected",
    [
        ("hello", ["hello"], 1.0),
        ("Hello World ", ["hello world"], 1.0),  # not case sensitive; surrounding whitespace out
        ("hello  world", ["hello world"], pytest.approx(1 - 1 / 12)),  # space sensitive: one extra space
        ("helo", ["hello"], 0.8),  # distance 1 / length 5 -> NL 0.2
        ("abc", ["abd"], 2 / 3),  # 1 / 3
        ("abcdef", ["abcdxx"], 2 / 3),  # 2 / 6
        ("ab", ["abcd"], 0.0),  # NL 2 / 4 = 0.5 is not below the 0.5 threshold
        ("abcdefghij", ["abcdefg"], 0.7),  # 3 / 10, lengths differ: divide by the longer
        ("cat", ["dog", "cats"], 0.75),  # best reference: "cats" at 1 / 4
        ("3.5", ["35"], 2 / 3),  # no VQA normalisation: the period counts
        ("", [""], 1.0),
        ("", ["abc"], 0.0),
        ("anything", [], 0.0),
    ],
)
def test_anls(pred, answers, expected):
    assert anls(pred, answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    "pred, answers, expected",
    [
        ("12", ["12"], 1.0),
        ("12.5", ["12"], 1.0),  # 0.5 / 12 = 4.2%
        ("12.7", ["12"], 0.0),  # 0.7 / 12 = 5.8%
        ("105", ["100"], 1.0),  # exactly 5%
        ("11.4", ["12"], 1.0),  # exactly 5% (floating point would say 5.0000000004%)
        ("105.1", ["100"], 0.0),
        ("94.9", ["100"], 0.0),
        ("-5", ["-5.1"], 1.0),  # 0.1 / 5.1 = 2%
        ("12.", ["12"], 1.0),  # float("12.") is 12
        ("1,234", ["1234"], 0.0),  # no number to pix2struct, and not the same text
        ("$3", ["3"], 0.0),
        ("45%", ["0.45"], 1.0),  # a percentage is its fraction
        ("45", ["45%"], 0.0),  # 45 against 0.45
        ("0", ["0"], 1.0),
        ("0.0", ["0"], 0.0),  # a zero reference is compared as text
        ("0.01", ["0"], 0.0),
        ("Yes", ["yes"], 1.0),  # text: case ignored
        ("Yes.", ["yes"], 0.0),  # ... nothing else
        ("blue line", ["Blue"], 0.0),
        ("12 apples", ["12"], 0.0),  # not a number, and not the same text
        ("7", ["six", "7.2"], 1.0),  # best reference: 0.2 / 7.2 = 2.8%
    ],
)
def test_relaxed_match(pred, answers, expected):
    assert relaxed_match(pred, answers) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("b", "B"),  # AI2D writes its options in lower case
        (" (C) ", "C"),
        ("C.", "C"),
        ("[d]", "D"),
        ("b) dog", "B"),  # a labelled option, as the AI2D converter writes answers
        ("B. dog", "B"),
        ("(A) cat", "A"),
        ("The answer is D.", "D"),
        ("The answer is (C).", "C"),
        ("A red circle", ""),  # a sentence starting with a capital names no option
        ("a cat", ""),
        ("I don't know", ""),
        ("The answer is a cat", ""),  # lower-case "a" after "answer is" is the article
        ("", ""),
    ],
)
def test_choice_letter(text, expected):
    assert choice_letter(text) == expected


def test_mc_accuracy_hand_computed():
    preds = ["A", "b) dog", "The answer is C.", "red", "D"]
    refs = [["A"], ["B"], ["b) cat"], ["C"], ["B"]]
    # letters: A=A right, B=B right, C vs b) -> B wrong, "red" unparsed (wrong), D vs B wrong
    assert mc_accuracy(preds, refs) == pytest.approx({"accuracy": 2 / 5, "unparsed": 1 / 5})


def test_mc_accuracy_reference_without_letter_is_an_error():
    with pytest.raises(ValueError, match="name no option letter"):
        mc_accuracy(["A"], [["a red circle"]])
