"""Evaluation: per-question suffixes, batched left-padded greedy generation, the report, and the judge review
(a failing endpoint keeps the generated answers; `judge` reviews them later without generating again)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from llava_core.cli import main
from llava_core.config import EvalConfig
from llava_core.data.prompts import PROMPT_SUFFIXES
from llava_core.data.tokenizer import load_tokenizer
from llava_core.evaluation.evaluate import (
    answer_id,
    evaluate,
    generate,
    judge_answers,
    load_questions,
    question_category,
    question_suffix,
    with_suffix,
)
from llava_core.evaluation.judge import JudgeError
from llava_core.evaluation.metrics import METRICS
from llava_core.model.hf import export_hf, hf_from_training
from llava_core.model.llava import load_model
from tests.helpers_models import EVAL_QUESTIONS, JudgeServer, eval_config, eval_workspace, judge_reply, write_checkpoint

SHORT = PROMPT_SUFFIXES["short_answer"]
MC = PROMPT_SUFFIXES["multiple_choice"]


def test_suffix_texts_are_the_reference_ones():
    assert SHORT == "Answer the question using a single word or phrase."
    assert MC == "Answer with the option's letter from the given choices directly."


def test_suffix_choice_per_question():
    ec = EvalConfig(questions="q", image_folder="i", suffixes={"sqa": "multiple_choice", "bench": "none"})
    assert question_suffix({"category": "vqa"}, ec) == SHORT  # not in the map: eval.prompt_suffix
    assert question_suffix({"category": "sqa"}, ec) == MC
    assert question_suffix({"task": "sqa"}, ec) == MC  # `task` when there is no category
    assert question_suffix({"category": "bench"}, ec) == ""
    assert question_suffix({"category": "sqa", "suffix": "short_answer"}, ec) == SHORT  # the question wins
    assert question_category({"category": "a", "task": "b"}) == "a"
    assert question_category({}) == "default"
    assert with_suffix("Which? A. x B. y", MC) == f"Which? A. x B. y\n{MC}"
    assert with_suffix(f"What?\n{SHORT}", SHORT) == f"What?\n{SHORT}"  # already there: not twice
    assert with_suffix("Describe.", "") == "Describe."


def test_unknown_question_suffix_is_an_error(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": 1, "image": "a.png", "text": "t", "answers": ["x"], "suffix": "long"}))
    with pytest.raises(ValueError, match="q.jsonl:1: unknown suffix 'long'; valid: \\['multiple_choice'"):
        load_questions(path)


def test_batched_left_padded_generation_equals_one_at_a_time(tmp_path):
    cfg = eval_config(tmp_path)
    tok = load_tokenizer(cfg.resolve_file(cfg.model.tokenizer))
    conv = hf_from_training(load_model(write_checkpoint(cfg, tok, seed=3)).eval(), tok)
    prompts = [
        "What color is the circle?",
        f"How many shapes are there in the image?\n{SHORT}",  # longer: the others get left padding
        "Is there a cross?",
    ]
    images = [Image.new("RGB", (40, 30), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    kw = {"prompt_style": "vicuna_v1", "image_token_id": conv.image_token_id, "max_new_tokens": 5}
    batched = generate(conv.model, conv.tokenizer, prompts, images, batch_size=3, **kw)
    single = [
        generate(conv.model, conv.tokenizer, [p], [i], batch_size=1, **kw)[0]
        for p, i in zip(prompts, images, strict=True)
    ]
    assert batched == single
    assert len(set(batched)) > 1  # the inputs matter (not one constant answer)


@pytest.fixture
def exported(tmp_path):
    def make(**kwargs):
        cfg = eval_config(tmp_path / "ws", **kwargs)
        write_checkpoint(cfg, load_tokenizer(cfg.resolve_file(cfg.model.tokenizer)))
        export_hf(cfg)
        return cfg

    return make


def test_evaluate_writes_answers_and_report(exported):
    cfg = exported()
    result = evaluate(cfg)
    answers = [json.loads(line) for line in result.answers_path.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [0, 1, 2, 3, 4]
    prompts = {a["question_id"]: a["prompt"] for a in answers}
    assert prompts[0] == f"What color is the shape?\n{SHORT}"  # default suffix
    assert prompts[3] == f"Which shape? A. circle B. square\n{MC}"  # eval.suffixes by task
    assert prompts[4] == "Describe the image."  # the question's own "none"
    assert [a["category"] for a in answers] == ["color", "color", "exists", "choice", "detail"]

    report = json.loads(result.report_path.read_text())
    assert report == result.report
    by = report["by_category"]
    assert {c: m["metric"] for c, m in by.items()} == {
        "color": "exact_match",
        "exists": "pope",
        "choice": "mc_accuracy",
        "detail": "anls",
    }
    assert set(by["exists"]) >= {"precision", "recall", "f1", "yes_ratio"}
    assert "unparsed" in by["choice"] and "anls" in by["detail"]
    # the report is the metrics of the written answers
    for cat, m in by.items():
        rows = [a for a in answers if a["category"] == cat]
        expected = METRICS[m["metric"]]([a["text"] for a in rows], [a["answers"] for a in rows])
        assert {k: m[k] for k in expected} == pytest.approx(expected)
        assert m["n"] == len(rows)
    overall = sum(by[c]["accuracy"] * by[c]["n"] for c in by) / len(EVAL_QUESTIONS)
    assert report["overall_accuracy"] == pytest.approx(overall)
    assert "judge" not in report
    # no HDF5 data in this workspace: no training statistics, `auto` is the former default, nothing is warned
    assert report["prompt_suffix"]["training_statistics"] is None and report["warnings"] == []
    assert report["prompt_suffix"]["by_category"]["color"]["suffix"] == "short_answer"


def read_as_llava_scripts_do(answers_path, questions: list[dict]) -> dict:
    """What LLaVA's scripts take from an answers file (restated from llava/eval/*.py and scripts/convert_*.py):
    every line is a JSON object; convert_vqav2/vizwiz_for_submission map question_id -> text and look every
    question of the split up in it; convert_gqa_for_eval writes {questionId, prediction: text.rstrip('.').lower()};
    eval_textvqa takes the question from the first of a prompt's two lines; eval_pope groups texts by the
    question file's category; eval_science_qa reads text and prompt; model_vqa's own fields are question_id,
    prompt, text, answer_id, model_id, metadata."""
    results = [json.loads(line) for line in answers_path.read_text().splitlines()]
    for r in results:
        assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(r)
        assert isinstance(r["text"], str) and isinstance(r["prompt"], str) and isinstance(r["metadata"], dict)
    texts = {r["question_id"]: r["text"] for r in results}
    assert all(q["question_id"] in texts for q in questions)  # vizwiz asserts, vqav2 writes '' for a gap
    by_id = {q["question_id"]: q for q in questions}
    return {
        "vqav2": texts,
        "gqa": [{"questionId": r["question_id"], "prediction": r["text"].rstrip(".").lower()} for r in results],
        "textvqa": {
            r["question_id"]: r["prompt"].split("\n")[0].lower() for r in results if r["prompt"].count("\n") == 1
        },
        "pope": [(by_id[r["question_id"]].get("category"), r["text"]) for r in results],
        "answer_ids": [r["answer_id"] for r in results],
    }


def test_answers_file_reads_as_llavas_scripts_read_it(exported):
    cfg = exported()
    result = evaluate(cfg)
    answers = [json.loads(line) for line in result.answers_path.read_text().splitlines()]
    read = read_as_llava_scripts_do(result.answers_path, EVAL_QUESTIONS)
    assert read["vqav2"] == {a["question_id"]: a["text"] for a in answers}
    assert [g["questionId"] for g in read["gqa"]] == [q["question_id"] for q in EVAL_QUESTIONS]
    # the questions with a suffix on their own line give back their question text
    assert read["textvqa"] == {q["question_id"]: q["text"].lower() for q in EVAL_QUESTIONS if q["question_id"] != 4}
    assert [c for c, _ in read["pope"]] == ["color", "color", "exists", None, "detail"]  # (question 3 has a task)
    assert len(set(read["answer_ids"])) == len(answers)  # one id per answer, the same on every run:
    assert read["answer_ids"][0] == answer_id(answers[0]["model_id"], 0, answers[0]["prompt"], answers[0]["text"])


def test_failing_judge_keeps_answers_then_judge_reviews_them(exported, monkeypatch, capsys):
    monkeypatch.setenv("LLAVA_TEST_JUDGE_KEY", "sk-test")
    judge = {
        "base_url": "http://127.0.0.1:1/v1",
        "model": "judge-1",
        "api_key_env": "LLAVA_TEST_JUDGE_KEY",
        "categories": ["detail", "color"],
        "max_retries": 0,
        "retry_wait_s": 0.0,
        "timeout_s": 5,
    }
    with JudgeServer(lambda body, n: (502, {"error": "bad gateway"})) as down:
        judge["base_url"] = down.base_url
        cfg = exported(judge=judge)
        with pytest.raises(JudgeError, match="HTTP 502.*0 of 3 answers reviewed"):
            evaluate(cfg)
    reports = cfg.path("reports")
    answers_before = (reports / "answers.jsonl").read_text()
    assert len(answers_before.splitlines()) == 5  # every generated answer is kept
    assert not (reports / "eval.json").exists()

    # the CLI says it in one line, without a traceback
    capsys.readouterr()
    with JudgeServer(lambda body, n: (500, {"error": "still down"})) as down:
        params = eval_workspace(cfg.base_dir, judge={**judge, "base_url": down.base_url})
        assert main(["--params", str(params), "judge"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: judge review failed: judge endpoint http://127.0.0.1:")
    assert "HTTP 500" in err and "Traceback" not in err

    # a working endpoint: the review runs on the kept answers, nothing is generated again
    with JudgeServer(lambda body, n: judge_reply("8 4\nfine")) as up:
        params = eval_workspace(cfg.base_dir, judge={**judge, "base_url": up.base_url})
        from llava_core.params import load_config

        result = judge_answers(load_config(params))
    assert len(up.requests) == 3  # the two colour questions and the detail one
    assert up.requests[0]["headers"]["Authorization"] == "Bearer sk-test"
    assert (reports / "answers.jsonl").read_text() == answers_before
    report = json.loads((reports / "eval.json").read_text())
    assert report == result.report
    assert set(report["by_category"]) == {"color", "exists", "choice", "detail"}
    assert report["judge"]["overall"] == pytest.approx(
        {"n": 3, "unparsed": 0, "reference_score": 8.0, "model_score": 4.0, "relative_score": 50.0}
    )
    assert set(report["judge"]["by_category"]) == {"color", "detail"}
    assert len((reports / "reviews.jsonl").read_text().splitlines()) == 3


def test_judge_without_config_or_answers(tmp_path):
    cfg = eval_config(tmp_path)
    with pytest.raises(ValueError, match="eval.judge is not set"):
        judge_answers(cfg)
    cfg = eval_config(tmp_path, judge={"base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key_env": None})
    with pytest.raises(FileNotFoundError, match="answers.jsonl does not exist: run the evaluation first"):
        judge_answers(cfg)


def test_pixels_reach_the_model_in_its_dtype(tmp_path):
    """bf16 weights (as a 7B export is often loaded) get bf16 pixels; generation runs."""
    cfg = eval_config(tmp_path)
    tok = load_tokenizer(cfg.resolve_file(cfg.model.tokenizer))
    conv = hf_from_training(load_model(write_checkpoint(cfg, tok)).eval(), tok)
    model = conv.model.to(torch.bfloat16)
    [answer] = generate(
        model,
        conv.tokenizer,
        ["What color?"],
        [Image.new("RGB", (32, 32))],
        prompt_style="vicuna_v1",
        image_token_id=conv.image_token_id,
        batch_size=1,
        max_new_tokens=2,
    )
    assert isinstance(answer, str)
