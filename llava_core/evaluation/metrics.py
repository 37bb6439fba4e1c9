"""The evaluation metrics as the benchmarks' official evaluators compute them, without torch (docs/evaluation.md).

Every metric in `METRICS` takes (predictions, reference answer lists) and returns a dict whose `accuracy` is the
headline score (the one averaged into `overall_accuracy`), plus the metric's own figures:

| metric | for | rule (whose) |
|---|---|---|
| exact_match | GQA | the answer, trailing periods cut and lower-cased, equals a reference (LLaVA's conversion + GQA's eval.py) |
| vqa_accuracy | VQAv2, VizWiz, TextVQA | mean over the leave-one-out subsets of the human answers of min(1, matches / 3), answers processed as EvalAI does (VQA's evaluator, LLaVA's m4c_evaluator) |
| anls | DocVQA, InfographicVQA | 1 - normalised Levenshtein distance, 0 when >= 0.5, best reference (Biten et al. 2019) |
| relaxed_accuracy | ChartQA | numbers within 5% of the reference, other answers equal ignoring case (pix2struct) |
| mc_accuracy | ScienceQA, MMBench, AI2D | the option letter read from the answer equals the reference letter |
| pope | POPE | accuracy, precision, recall, F1 (positive = yes), yes-ratio (LLaVA's eval_pope) |
"""

from __future__ import annotations

import re

# --- VQA answer processing (EvalAI's, as the VQA/TextVQA evaluators and LLaVA's submission converters apply it) ---
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
# Removed where written next to a space, else replaced by a space ("top-left" -> "top left", "yes !" -> "yes").
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit goes: "2." -> "2", "3.5" kept
# The contractions the official table restores, written in their restored form: a form with one apostrophe is
# restored from the word without it ("dont" -> "don't"), one with several from the word missing any one of them
# ("couldnt've", "couldn'tve" -> "couldn't've").
_RESTORED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't "
    "we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've"
).split()


def _contractions() -> dict[str, str]:
    table = {"somebody'd": "somebodyd"}  # the official table's one entry the other way round
    for form in _RESTORED:
        marks = [i for i, c in enumerate(form) if c == "'"]
        if len(marks) == 1:
            table[form.replace("'", "")] = form
        else:
            table.update((form[:i] + form[i + 1 :], form) for i in marks)
    return table


_CONTRACTIONS = _contractions()


def process_vqa_answer(text: str) -> str:
    """EvalAI's answer processing: lower case, `,` and `?` out, `'s` split off, punctuation (removed next to a
    space, else a space), periods not followed by a digit out, number words to digits, articles dropped,
    contractions restored ("dont" -> "don't"), words joined by single spaces."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text) else " ")
    words = [_NUMBERS.get(w, w) for w in _PERIOD.sub("", out).split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(pred: str, answers: list[str]) -> float:
    """The official VQA accuracy of one answer: each human answer left out in turn, min(1, matches among the
    others / 3); the mean of those scores. With ten answers: 3 agreeing give 0.9, 4 or more 1.0."""
    if not answers:
        return 0.0
    p = process_vqa_answer(pred)
    refs = [process_vqa_answer(a) for a in answers]
    scores = [min(1.0, sum(r == p for j, r in enumerate(refs) if j != i) / 3.0) for i in range(len(refs))]
    return sum(scores) / len(scores)


def exact_match(pred: str, answers: list[str]) -> float:
    """GQA's accuracy: the answer as LLaVA's `convert_gqa_for_eval` writes it (trailing periods cut, lower case)
    equals a reference (GQA's eval.py compares strings; its references are lower case)."""
    p = pred.strip().rstrip(".").lower()
    return float(any(p == a.strip().lower() for a in answers))


def yes_no(text: str) -> str:
    """POPE's reading of an answer (LLaVA's eval_pope): its first sentence, commas out, split at spaces; "no" when
    a word is `No`, `no` or `not`, else "yes"."""
    first = text.split(".")[0].replace(",", "")
    return "no" if {"No", "no", "not"} & set(first.split(" ")) else "yes"


def pope_metrics(preds: list[str], answers: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive = yes) and yes-ratio over yes/no questions (a reference other
    than "no" is a yes, as eval_pope reads its labels)."""
    p = [yes_no(x) for x in preds]
    g = ["no" if a.strip().lower() == "no" else "yes" for a in answers]
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


def anls(pred: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one answer (Biten et al. 2019, eq. 1): max over references of
    1 - NL, 0 where NL >= 0.5; NL = edit distance / the longer length. Not case sensitive, space sensitive
    (DocVQA's rules): lower case, surrounding whitespace out."""
    p = pred.strip().lower()
    best = 0.0
    for a in answers:
        g = a.strip().lower()
        longest = max(len(p), len(g))
        nl = levenshtein(p, g) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def _to_float(text: str) -> float | None:
    """A number as pix2struct's relaxed correctness reads it ('12', '4.5', '45%' -> 0.45); None otherwise."""
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(pred: str, answers: list[str], tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy (pix2struct's relaxed_correctness), best reference: with both numbers and a
    non-zero reference, a relative error within `tolerance`; otherwise equal strings ignoring case."""
    p_num = _to_float(pred)
    for a in answers:
        a_num = _to_float(a)
        if p_num is not None and a_num:
            # (1e-9: 11.4 against 12 is 5% even where floating point makes it 5.0000000004%)
            ok = abs(p_num - a_num) / abs(a_num) <= tolerance + 1e-9
        else:
            ok = pred.lower() == a.lower()
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
