"""Stage 5b, evaluation: batched greedy answers from the converted HF model, scored per question category.

Input is a LLaVA `model_vqa`-style question file (question_id, image, text, answers, category). Prompts are
built by `prompts.encode_conversation` (the same code that built the training data), with the image slots
set to the `<image>` token that `LlavaForConditionalGeneration` fills. Output: `reports/answers.jsonl` and
`reports/eval.json` (metrics per category: exact match, VQA accuracy or POPE).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_core.config import PipelineConfig, write_json_atomic
from llava_core.images import check_image, clip_transform, load_rgb
from llava_core.metrics import METRICS
from llava_core.prompts import encode_conversation


@dataclass
class EvalResult:
    report_path: Path
    answers_path: Path
    report: dict


def load_questions(path: Path) -> list[dict]:
    questions = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            missing = [k for k in ("question_id", "image", "text", "answers") if k not in q]
            if missing:
                raise ValueError(f"{path}:{n}: question lacks {missing}")
            questions.append(q)
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


@torch.no_grad()
def generate_answers(
    hf_model, tokenizer, questions: list[dict], image_folder: Path, cfg: PipelineConfig, image_token_id: int
) -> list[str]:
    """Greedy answers, batched with left padding."""
    ec = cfg.eval
    size = hf_model.config.vision_config.image_size
    num_patches = hf_model.config.image_seq_length
    pad = tokenizer.pad_token_id
    answers: list[str] = []
    for start in range(0, len(questions), ec.batch_size):
        batch = questions[start : start + ec.batch_size]
        seqs, pixels = [], []
        for q in batch:
            text = q["text"] + (f"\n{ec.prompt_suffix}" if ec.prompt_suffix else "")
            enc = encode_conversation(
                [{"from": "human", "value": f"<image>\n{text}"}],
                tokenizer,
                ec.prompt_style,
                num_patches,
                pad,
                for_generation=True,
            )
            ids = list(enc.input_ids)
            ids[enc.image_start : enc.image_start + num_patches] = [image_token_id] * num_patches
            seqs.append(ids)
            pixels.append(clip_transform(load_rgb(check_image(image_folder, q["image"])), size))
        width = max(len(s) for s in seqs)
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        out = hf_model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            pixel_values=torch.stack(pixels),
            max_new_tokens=ec.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        for row in out[:, width:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def score(questions: list[dict], preds: list[str], cfg: PipelineConfig) -> dict:
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        by_cat[q.get("category", "default")].append(i)
    report: dict = {"num_questions": len(questions), "by_category": {}}
    weighted = 0.0
    for cat, idx in sorted(by_cat.items()):
        metric = cfg.eval.metrics.get(cat, cfg.eval.default_metric)
        m = METRICS[metric]([preds[i] for i in idx], [questions[i]["answers"] for i in idx])
        report["by_category"][cat] = {"metric": metric, "n": len(idx), **m}
        weighted += m["accuracy"] * len(idx)
    report["overall_accuracy"] = weighted / len(questions)
    return report


def evaluate(cfg: PipelineConfig) -> EvalResult:
    """Answer the held-out questions with `models/hf` and write `reports/answers.jsonl` + `reports/eval.json`."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model_dir = cfg.path("models") / "hf"
    if not (model_dir / "export_info.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no converted model: run the checkpoint conversion first")
    info = json.loads((model_dir / "export_info.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    torch.manual_seed(cfg.seed)
    questions = load_questions(cfg.image_root / cfg.eval.questions)
    preds = generate_answers(
        model, tokenizer, questions, cfg.image_root / cfg.eval.image_folder, cfg, info["image_token_id"]
    )
    reports = cfg.path("reports")
    reports.mkdir(parents=True, exist_ok=True)
    answers_path = reports / "answers.jsonl"
    tmp = answers_path.with_name(f".{answers_path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for q, p in zip(questions, preds, strict=True):
            f.write(
                json.dumps(
                    {
                        "question_id": q["question_id"],
                        "prompt": q["text"],
                        "text": p,
                        "answers": q["answers"],
                        "category": q.get("category"),
                    }
                )
                + "\n"
            )
    tmp.replace(answers_path)
    report = score(questions, preds, cfg)
    report["model"] = str(model_dir)
    report["questions"] = cfg.eval.questions
    report_path = reports / "eval.json"
    write_json_atomic(report_path, report)
    return EvalResult(report_path, answers_path, report)
