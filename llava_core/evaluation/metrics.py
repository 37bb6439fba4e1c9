"""Answer normalisation and the evaluation metrics, without torch (docs/evaluation.md).

Every metric in `METRICS` takes (predictions, reference answer lists) and returns a dict whose `accuracy` is the
headline score (the one averaged into `overall_accuracy`), plus the metric's own figures:

| metric | for | rule |
|---|---|---|
| exact_match | GQA, VizWiz | normalised prediction equals a normalised reference |
| vqa_accuracy | VQAv2, TextVQA | min(1, matching references / 3) after normalisation |
| anls | DocVQA, InfographicVQA | 1 - normalised Levenshtein distance, 0 when >= 0.5, best reference |
| relaxed_accuracy | ChartQA | numbers within 5% of the reference, other answers equal (case-insensitive) |
| mc_accuracy | ScienceQA, MMBench, AI2D | the option letter read from the answer equals the reference letter |
| pope | POPE | accuracy, precision, recall, F1 (positive = yes), yes-ratio |
"""

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


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_normalize(text: str) -> str:
    """DocVQA's normalisation for ANLS: lower case, surrounding whitespace out, inner runs folded."""
    return " ".join(text.strip().lower().split())


def anls(pred: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one answer: max over references of 1 - NL, 0 where NL >= 0.5."""
    p = _anls_normalize(pred)
    best = 0.0
    for a in answers:
        g = _anls_normalize(a)
        longest = max(len(p), len(g))
        nl = levenshtein(p, g) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def _to_float(text: str) -> float | None:
    """A number as ChartQA writes it: '12', '1,234.5', '45%' (-> 0.45), '$3' ; None when it is not one."""
    t = text.strip().rstrip(".").replace(",", "").lstrip("$").strip()
    try:
        return float(t[:-1].strip()) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
        return None


def relaxed_match(pred: str, answers: list[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: numbers within `tolerance` relative error (exact for a zero reference),
    anything else equal after lower-casing and stripping whitespace and a trailing period; best reference."""
    p_num = _to_float(pred)
    p_txt = pred.strip().rstrip(".").strip().lower()
    for a in answers:
        a_num = _to_float(a)
        if p_num is not None and a_num is not None:
            # (1e-9: 11.4 against 12 is 5% even where floating point makes it 5.0000000004%)
            ok = p_num == a_num if a_num == 0 else abs(p_num - a_num) / abs(a_num) <= tolerance + 1e-9
        else:
            ok = p_txt == a.strip().rstrip(".").strip().lower()
        if ok:
            return 1.0
    return 0.0


_LETTER_ALONE = re.compile(r"^[(\[]?([A-Za-z])[)\].:]?$")  # "B", "(b)", "B.", "b)"
_LETTER_LEAD = re.compile(r"^[(\[]?([A-Za-z])[)\].:]\s")  # "B. blue", "b) blue", "(B) blue"
_ANSWER_IS = re.compile(r"(?i:answer is):?\s*[(\[]?([A-Z])\b")  # "The answer is B." (upper case: "is a cat" names none)


def choice_letter(text: str) -> str:
    """The option letter an answer names, upper case, or "" when it names none.

    Accepted (as the LLaVA ScienceQA/MMBench scripts do): the letter alone, optionally bracketed or followed by
    a period or colon ("B", "(b)", "B."), a letter labelling the option it leads ("b) y", "B. y"), or one
    upper-case letter after "answer is" ("The answer is B."). A sentence that merely starts with a capital
    ("A red circle") names no option.
    """
    t = text.strip()
    for pattern in (_LETTER_ALONE, _LETTER_LEAD):
        m = pattern.match(t)
        if m:
            return m.group(1).upper()
    found = {m.group(1).upper() for m in _ANSWER_IS.finditer(t)}
    return found.pop() if len(found) == 1 else ""


def mc_accuracy(preds: list[str], refs: list[list[str]]) -> dict[str, float]:
    """Multiple-choice letter accuracy; references are letters or labelled options ("b) y"); answers naming no
    letter count as wrong and are reported as `unparsed` (a fraction)."""
    correct = unparsed = 0
    for p, r in zip(preds, refs, strict=True):
        letter = choice_letter(p)
        unparsed += letter == ""
        gold = {choice_letter(a) for a in r} - {""}
        if not gold:
            raise ValueError(f"reference answers {r!r} name no option letter")
        correct += letter in gold
    n = max(1, len(preds))
    return {"accuracy": correct / n, "unparsed": unparsed / n}


def _mean_metric(fn):
    def score(preds: list[str], refs: list[list[str]]) -> dict[str, float]:
        return {"accuracy": sum(fn(p, r) for p, r in zip(preds, refs, strict=True)) / max(1, len(preds))}

    return score


def _anls_metric(preds: list[str], refs: list[list[str]]) -> dict[str, float]:
    score = _mean_metric(anls)(preds, refs)["accuracy"]
    return {"accuracy": score, "anls": score}


METRICS = {
    "exact_match": _mean_metric(exact_match),
    "vqa_accuracy": _mean_metric(vqa_accuracy),
    "anls": _anls_metric,
    "relaxed_accuracy": _mean_metric(relaxed_match),
    "mc_accuracy": mc_accuracy,
    "pope": lambda preds, refs: pope_metrics(preds, [r[0] for r in refs]),
}
