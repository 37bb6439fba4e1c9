"""Stage 5b, evaluation: batched greedy answers from the converted HF model, scored per question category.

Input is a LLaVA `model_vqa`-style question file (question_id, image, text, answers, and a `category` or `task`
that picks the metric in `eval.metrics`). Each question gets an evaluation suffix (docs/evaluation.md):
the question's own `suffix` (a `PROMPT_SUFFIXES` name), else `eval.suffixes[category]`, else
`eval.prompt_suffix` (`auto`: the form the phase-2 training questions had, `evaluation/suffixes.py`); a text that
already ends with it is left alone. The report gives each category's suffix and the share of training questions
that carried it, and a warning (logged too) for a suffix under 1%. Prompts are built by
`prompts.encode_conversation` (the code that built the training data), with the image slots set to the `<image>`
token that `LlavaForConditionalGeneration` fills, left-padded into batches and decoded greedily.
Output: `reports/answers.jsonl` (written first, kept whatever happens later) and `reports/eval.json` (metrics per
category and, when `eval.judge` is set, the judge review; `reports/reviews.jsonl` holds each review).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from llava_core.artifacts import ANSWERS, EVAL_PLOT, EVAL_REPORT, EXPORT_INFO, REVIEWS
from llava_core.atomic import staged, write_json_atomic
from llava_core.config import EvalConfig, PipelineConfig
from llava_core.data.images import ImageRejected, check_image, clip_transform, load_rgb
from llava_core.data.prompts import (
    IMAGE_PLACEHOLDER,
    PROMPT_SUFFIXES,
    encode_conversation,
    text_is_valid_unicode,
    with_suffix,
)
from llava_core.evaluation.metrics import METRICS
from llava_core.evaluation.suffixes import TrainingSuffixes, category_suffix, choose_suffixes, suffix_report

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    report_path: Path
    answers_path: Path
    report: dict


def load_questions(path: Path) -> list[dict]:
    """The question file, checked line by line: any bad line is an error naming it (a question is never dropped:
    that would change what the scores mean)."""
    questions = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text ({e})") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(q, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(q).__name__}")
            missing = [k for k in ("question_id", "image", "text", "answers") if k not in q]
            if missing:
                raise ValueError(f"{path}:{n}: question lacks {missing}")
            if not isinstance(q["text"], str) or not text_is_valid_unicode(q):
                raise ValueError(f"{path}:{n}: the question text is not a valid string")
            if "suffix" in q and q["suffix"] not in PROMPT_SUFFIXES:
                raise ValueError(f"{path}:{n}: unknown suffix {q['suffix']!r}; valid: {sorted(PROMPT_SUFFIXES)}")
            questions.append(q)
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def question_category(q: dict) -> str:
    """The group a question is scored in: its `category`, else its `task`, else "default"."""
    return q.get("category") or q.get("task") or "default"


def question_suffix(q: dict, ec: EvalConfig, chosen: dict[str, str] | None = None) -> str:
    """The question's own `suffix`, else its category's (`chosen` by `suffixes.choose_suffixes`; without it, as
    chosen without training statistics)."""
    if q.get("suffix") is not None:
        return PROMPT_SUFFIXES[q["suffix"]]
    cat = question_category(q)
    name = chosen[cat] if chosen and cat in chosen else category_suffix(ec, cat, TrainingSuffixes())
    return PROMPT_SUFFIXES[name]


def generation_ids(
    text: str, tokenizer, prompt_style: str, num_patches: int, pad_id: int, image_token_id: int
) -> list[int]:
    """The prompt of one question as LLaVA's evaluation builds it (`{SYSTEM} USER: <image>\n{text} ASSISTANT:`,
    split at the image, each piece tokenised by itself), through the encoder that built the training rows, with
    the image slots set to the `<image>` token that `LlavaForConditionalGeneration` fills."""
    enc = encode_conversation(
        [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{text}"}],
        tokenizer,
        prompt_style,
        num_patches,
        pad_id,
        for_generation=True,
    )
    ids = list(enc.input_ids)
    ids[enc.image_start : enc.image_start + num_patches] = [image_token_id] * num_patches
    return ids


@torch.no_grad()
def generate(
    hf_model,
    tokenizer,
    prompts: list[str],
    images: list[Image.Image],
    *,
    prompt_style: str,
    image_token_id: int,
    batch_size: int,
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers to (prompt, image) pairs, batched with left padding."""
    size = hf_model.config.vision_config.image_size
    num_patches = hf_model.config.image_seq_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        seqs, pixels = [], []
        for text, image in zip(prompts[start : start + batch_size], images[start : start + batch_size], strict=True):
            seqs.append(generation_ids(text, tokenizer, prompt_style, num_patches, pad, image_token_id))
            pixels.append(clip_transform(image, size))
        width = max(len(s) for s in seqs)
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])  # (B, T), left padded
        attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        dtype = next(hf_model.parameters()).dtype
        out = hf_model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            pixel_values=torch.stack(pixels).to(dtype),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        for row in out[:, width:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def question_prompts(questions: list[dict], cfg: PipelineConfig) -> list[str]:
    """Each question's text with its evaluation suffix (the categories' suffixes chosen once, training statistics
    read: a category naming a dataset they lack is an error before anything is generated)."""
    chosen = choose_suffixes(cfg.eval, [question_category(q) for q in questions], TrainingSuffixes.load(cfg))
    return [with_suffix(q["text"], question_suffix(q, cfg.eval, chosen)) for q in questions]


def generate_answers(
    hf_model, tokenizer, questions: list[dict], image_folder: Path, cfg: PipelineConfig, image_token_id: int
) -> list[str]:
    """Greedy answers to the questions, each with its evaluation suffix."""
    ec = cfg.eval
    prompts = question_prompts(questions, cfg)
    images = [load_rgb(_question_image(image_folder, q)) for q in questions]
    return generate(
        hf_model,
        tokenizer,
        prompts,
        images,
        prompt_style=ec.prompt_style,
        image_token_id=image_token_id,
        batch_size=ec.batch_size,
        max_new_tokens=ec.max_new_tokens,
    )


def _question_image(image_folder: Path, q: dict) -> Path:
    try:
        return check_image(image_folder, q["image"])
    except ImageRejected as e:
        raise ValueError(f"question {q['question_id']!r}: unusable image ({e}; under {image_folder})") from None


def score(questions: list[dict], preds: list[str], cfg: PipelineConfig) -> dict:
    """Metrics per category (the metric `eval.metrics` names for it, else `eval.default_metric`)."""
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        by_cat[question_category(q)].append(i)
    report: dict = {"num_questions": len(questions), "by_category": {}}
    weighted = 0.0
    for cat, idx in sorted(by_cat.items()):
        metric = cfg.eval.metrics.get(cat, cfg.eval.default_metric)
        m = METRICS[metric]([preds[i] for i in idx], [questions[i]["answers"] for i in idx])
        report["by_category"][cat] = {"metric": metric, "n": len(idx), **m}
        weighted += m["accuracy"] * len(idx)
    report["overall_accuracy"] = weighted / len(questions)
    return report


def answer_records(questions: list[dict], preds: list[str], prompts: list[str], model_id: str) -> list[dict]:
    """One record per question with the fields LLaVA's `model_vqa*` scripts write (question_id, prompt, text,
    answer_id, model_id, metadata), which its `convert_*_for_submission` and `eval_*` scripts read, and ours."""
    return [
        {
            "question_id": q["question_id"],
            "prompt": prompt,
            "text": p,
            "answer_id": answer_id(model_id, q["question_id"], prompt, p),
            "model_id": model_id,
            "metadata": {},
            "image": q["image"],
            "answers": q["answers"],
            "category": question_category(q),
            **({"context": q["context"]} if "context" in q else {}),
        }
        for q, p, prompt in zip(questions, preds, prompts, strict=True)
    ]


def answer_id(model_id: str, question_id, prompt: str, text: str) -> str:
    """A 22-character id, as LLaVA's (shortuuid) are long, but reproducible: the same answer gets the same id."""
    key = json.dumps([model_id, question_id, prompt, text], ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:22]


def write_answers(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with staged(path, tmp), open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def read_answers(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the evaluation first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def finish_report(cfg: PipelineConfig, records: list[dict], model: str) -> EvalResult:
    """Score the answer records, run the judge review when configured, write `reports/eval.json`; `model` names
    the model folder relative to the workspace root (no absolute path: the report is the same in any checkout)."""
    reports = cfg.path("reports")
    report = score(records, [r["text"] for r in records], cfg)
    report["model"] = model
    report["questions"] = cfg.eval.questions
    report["prompt_suffix"], report["warnings"] = suffix_report(cfg, records)
    for w in report["warnings"]:
        log.warning(f"warning: {w}")
    if cfg.eval.judge is not None:
        from llava_core.evaluation.judge import JudgeClient, review_answers

        jc = cfg.eval.judge
        report["judge"] = review_answers(records, JudgeClient.from_config(jc), reports / REVIEWS, jc.categories)
    report_path = reports / EVAL_REPORT
    write_json_atomic(report_path, report)
    if report["by_category"]:
        from llava_core.plots import scores_plot

        scores_plot(report["by_category"], reports / EVAL_PLOT)
    return EvalResult(report_path, reports / ANSWERS, report)


def evaluate(cfg: PipelineConfig) -> EvalResult:
    """Answer the held-out questions with `models/hf` and write `reports/answers.jsonl` + `reports/eval.json`.

    The answers are written before the (optional) judge review, so a failing judge endpoint keeps them;
    `judge_answers` then reviews them without generating again.
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model_dir = cfg.path("models") / "hf"
    if not (model_dir / EXPORT_INFO).is_file():
        raise FileNotFoundError(f"{model_dir} holds no converted model: run the checkpoint conversion first")
    info = json.loads((model_dir / EXPORT_INFO).read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    torch.manual_seed(cfg.seed)
    questions = load_questions(cfg.image_root / cfg.eval.questions)
    preds = generate_answers(
        model, tokenizer, questions, cfg.image_root / cfg.eval.image_folder, cfg, info["image_token_id"]
    )
    prompts = question_prompts(questions, cfg)
    records = answer_records(questions, preds, prompts, cfg.rel(model_dir))
    write_answers(cfg.path("reports") / ANSWERS, records)
    return finish_report(cfg, records, cfg.rel(model_dir))


def judge_answers(cfg: PipelineConfig) -> EvalResult:
    """Review the existing `reports/answers.jsonl` with the judge (no generation) and rewrite `reports/eval.json`."""
    if cfg.eval.judge is None:
        raise ValueError("eval.judge is not set in the params file: no judge endpoint to review the answers with")
    records = read_answers(cfg.path("reports") / ANSWERS)
    return finish_report(cfg, records, records[0].get("model_id", "") if records else "")
