"""Judge review against a local OpenAI-compatible endpoint (http.server on 127.0.0.1 in a thread)."""

from __future__ import annotations

import json

import pytest

from llava_core.config import JudgeConfig
from llava_core.evaluation.judge import (
    JudgeClient,
    JudgeError,
    parse_scores,
    review_answers,
    review_messages,
    summarize,
)
from tests.helpers_models import JudgeServer, judge_reply

RECORDS = [
    {
        "question_id": 1,
        "prompt": "What is shown?",
        "text": "a red square",
        "answers": ["A red square."],
        "category": "conv",
    },
    {"question_id": 2, "prompt": "Count them.", "text": "two", "answers": ["Three shapes."], "category": "conv"},
    {"question_id": 3, "prompt": "Describe.", "text": "shapes", "answers": ["A detailed..."], "category": "detail"},
]


def client(server: JudgeServer, **kw) -> JudgeClient:
    return JudgeClient(server.base_url, "judge-1", api_key="test-key", retry_wait_s=0.0, timeout_s=5, **kw)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8 6\nAssistant 1 is better.", (8.0, 6.0)),
        ("8, 6", (8.0, 6.0)),
        ("7.5 9", (7.5, 9.0)),
        ("  10 3  \n", (10.0, 3.0)),
        ("Assistant 1: 8", None),
        ("8\n6", None),
        ("", None),
        ("eight six", None),
    ],
)
def test_parse_scores(text, expected):
    assert parse_scores(text) == expected


def test_review_messages_put_the_reference_first():
    system, user = review_messages("Q?", "the reference", "the answer", context="a caption")
    assert system["role"] == "system" and user["role"] == "user"
    c = user["content"]
    assert c.startswith("[Context]\na caption\n\n[Question]\nQ?\n\n")
    assert c.index("[Assistant 1]\nthe reference") < c.index("[Assistant 2]\nthe answer") < c.index("[System]")
    assert "two values indicating the scores for Assistant 1 and 2" in c
    assert "[Context]" not in review_messages("Q?", "r", "a")[1]["content"]


def test_review_against_local_endpoint(tmp_path):
    replies = {"a red square": "8 6\nok", "two": "10 5\nwrong count", "shapes": "I refuse to score"}

    def reply(body, n):
        answer = body["messages"][1]["content"].split("[Assistant 2]\n")[1].split("\n")[0]
        return judge_reply(replies[answer])

    with JudgeServer(reply) as server:
        summary = review_answers(RECORDS, client(server), tmp_path / "reviews.jsonl", [])
    # the requests: OpenAI chat-completions shape, key as a bearer token
    assert len(server.requests) == 3
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer test-key"
    assert req["body"]["model"] == "judge-1" and req["body"]["temperature"] == 0.2
    assert "[Assistant 1]\nA red square." in req["body"]["messages"][1]["content"]
    # hand-computed: conv (8,6) and (10,5) -> reference 9, model 5.5, relative 100*5.5/9; detail unparsed
    conv = summary["by_category"]["conv"]
    assert conv == pytest.approx(
        {"n": 2, "unparsed": 0, "reference_score": 9.0, "model_score": 5.5, "relative_score": 100 * 5.5 / 9}
    )
    assert summary["by_category"]["detail"] == {
        "n": 1,
        "unparsed": 1,
        "reference_score": 0.0,
        "model_score": 0.0,
        "relative_score": 0.0,
    }
    assert summary["overall"]["n"] == 3 and summary["overall"]["unparsed"] == 1
    assert summary["model"] == "judge-1"
    reviews = [json.loads(line) for line in (tmp_path / "reviews.jsonl").read_text().splitlines()]
    assert [r["scores"] for r in reviews] == [[8.0, 6.0], [10.0, 5.0], None]
    assert not (tmp_path / ".reviews.jsonl.partial").exists()


def test_categories_select_what_is_reviewed(tmp_path):
    with JudgeServer(lambda body, n: judge_reply("5 5")) as server:
        summary = review_answers(RECORDS, client(server), tmp_path / "reviews.jsonl", ["detail"])
    assert len(server.requests) == 1 and set(summary["by_category"]) == {"detail"}


def test_failing_endpoint_is_a_clear_error_after_retries(tmp_path):
    with JudgeServer(lambda body, n: (500, {"error": {"message": "model overloaded"}})) as server:
        with pytest.raises(JudgeError) as info:
            review_answers(RECORDS, client(server, max_retries=2), tmp_path / "reviews.jsonl", [])
    msg = str(info.value)
    assert f"{server.base_url}/chat/completions" in msg
    assert "HTTP 500" in msg and "model overloaded" in msg and "after 3 attempt(s)" in msg
    assert "0 of 3 answers reviewed" in msg
    assert len(server.requests) == 3  # one try + two retries
    assert not (tmp_path / "reviews.jsonl").exists()


def test_client_errors_are_not_retried(tmp_path):
    with JudgeServer(lambda body, n: (401, {"error": "bad key"})) as server:
        with pytest.raises(JudgeError, match="HTTP 401"):
            client(server, max_retries=3).complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 1


def test_unreachable_endpoint(tmp_path):
    c = JudgeClient("http://127.0.0.1:9/v1", "judge-1", retry_wait_s=0.0, max_retries=0, timeout_s=2)
    with pytest.raises(JudgeError, match="connection failed"):
        c.complete([{"role": "user", "content": "hi"}])


def test_malformed_reply_is_a_clear_error():
    with JudgeServer(lambda body, n: (200, {"result": "8 6"})) as server:
        with pytest.raises(JudgeError, match="without choices\\[0\\].message.content"):
            client(server).complete([{"role": "user", "content": "hi"}])
    with JudgeServer(lambda body, n: (200, "<html>gateway</html>")) as server:
        with pytest.raises(JudgeError, match="not JSON"):
            client(server).complete([{"role": "user", "content": "hi"}])


def test_rerun_after_a_failure_resumes(tmp_path):
    def flaky(body, n):
        return judge_reply("7 7") if n <= 2 else (503, {"error": "down"})

    with JudgeServer(flaky) as server:
        with pytest.raises(JudgeError, match="2 of 3 answers reviewed"):
            review_answers(RECORDS, client(server, max_retries=0), tmp_path / "reviews.jsonl", [])
    partial = tmp_path / ".reviews.jsonl.partial"
    assert len(partial.read_text().splitlines()) == 2  # the reviews already done are kept
    with JudgeServer(lambda body, n: judge_reply("9 3")) as server:
        summary = review_answers(RECORDS, client(server), tmp_path / "reviews.jsonl", [])
    assert len(server.requests) == 1  # only the missing one
    assert summary["overall"] == pytest.approx(
        {"n": 3, "unparsed": 0, "reference_score": 23 / 3, "model_score": 17 / 3, "relative_score": 100 * 17 / 23}
    )


def test_key_comes_from_the_environment(monkeypatch):
    jc = JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m", api_key_env="LLAVA_TEST_JUDGE_KEY")
    monkeypatch.delenv("LLAVA_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match="environment variable LLAVA_TEST_JUDGE_KEY, which is not set"):
        JudgeClient.from_config(jc)
    monkeypatch.setenv("LLAVA_TEST_JUDGE_KEY", "sk-123")
    assert JudgeClient.from_config(jc).api_key == "sk-123"
    keyless = JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m", api_key_env=None)
    assert JudgeClient.from_config(keyless).api_key is None


def test_summarize_of_nothing():
    assert summarize([], "m") == {
        "model": "m",
        "overall": {"n": 0, "unparsed": 0, "reference_score": 0.0, "model_score": 0.0, "relative_score": 0.0},
        "by_category": {},
    }
