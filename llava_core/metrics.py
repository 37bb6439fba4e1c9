"""Answer normalisation and the evaluation metrics (VQA accuracy, exact match, POPE), without torch."""

from __future__ import annotations

import re

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit: "2." -> "2", "3.5" kept


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, punctuation out (keeping decimals), number words to digits,
    articles dropped, whitespace folded."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _PERIOD.sub("", _PUNCT.sub(" ", text))
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(pred: str, answers: list[str]) -> float:
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(a) for a in answers))


def vqa_accuracy(pred: str, answers: list[str]) -> float:
    """min(1, #human answers equal to the prediction / 3) after normalisation."""
    p = normalize_answer(pred)
    return min(1.0, sum(p == normalize_answer(a) for a in answers) / 3.0)


def yes_no(text: str) -> str:
    """POPE's parsing: an answer containing 'no'/'not' as a word is 'no', otherwise 'yes'."""
    words = normalize_answer(text).split()
    return "no" if ("no" in words or "not" in words) else "yes"


def pope_metrics(preds: list[str], answers: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive = yes) and yes-ratio over yes/no questions."""
    p = [yes_no(x) for x in preds]
    g = [normalize_answer(a) for a in answers]
    tp = sum(a == "yes" and b == "yes" for a, b in zip(p, g, strict=True))
    fp = sum(a == "yes" and b == "no" for a, b in zip(p, g, strict=True))
    fn = sum(a == "no" and b == "yes" for a, b in zip(p, g, strict=True))
    tn = sum(a == "no" and b == "no" for a, b in zip(p, g, strict=True))
    n = max(1, len(p))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": (tp + fp) / n}


def _mean_metric(fn):
    def score(preds: list[str], refs: list[list[str]]) -> dict[str, float]:
        return {"accuracy": sum(fn(p, r) for p, r in zip(preds, refs, strict=True)) / max(1, len(preds))}

    return score


METRICS = {
    "exact_match": _mean_metric(exact_match),
    "vqa_accuracy": _mean_metric(vqa_accuracy),
    "pope": lambda preds, refs: pope_metrics(preds, [r[0] for r in refs]),
}
