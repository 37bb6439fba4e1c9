"""Judge review (LLaVA-Bench style): a judge model behind an OpenAI-compatible endpoint scores answers.

For each answer the judge sees the question (and a context, when the question has one), the reference answer as
"Assistant 1" and the model's answer as "Assistant 2", and replies with two scores from 1 to 10 on its first
line (the rule of LLaVA's `eval_gpt_review_bench.py`). The report gives the mean of each and the relative score
100 * model / reference, per category. The HTTP call is `POST {base_url}/chat/completions` with the standard
library; the key comes from the environment variable the config names. Reviews are appended to a partial file as
they arrive, so a failing endpoint loses nothing: the error says what failed and a rerun resumes.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from llava_core.config import JudgeConfig

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image.\n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential "
    "bias and ensuring that the order in which the responses were presented does not affect your judgment."
)
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class JudgeError(RuntimeError):
    """The judge endpoint failed or answered something unusable; the message says what and where."""


def review_messages(question: str, reference: str, answer: str, context: str | None = None) -> list[dict]:
    """The chat messages of one review: the reference answer is Assistant 1, the model's answer Assistant 2."""
    content = f"[Context]\n{context}\n\n" if context else ""
    content += (
        f"[Question]\n{question}\n\n"
        f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{RULE}\n\n"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def parse_scores(text: str) -> tuple[float, float] | None:
    """The two scores on the judge's first line ("8 6", "8, 6", "8.5 6"); None when it holds no such pair."""
    lines = text.strip().splitlines()
    if not lines:
        return None
    parts = lines[0].replace(",", " ").split()
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return None


@dataclass
class JudgeClient:
    """`POST {base_url}/chat/completions`; retries connection errors, 429 and 5xx; raises `JudgeError`."""

    base_url: str
    model: str
    api_key: str | None = None
    temperature: float = 0.2
    max_tokens: int = 1024
    timeout_s: float = 60.0
    max_retries: int = 2
    retry_wait_s: float = 2.0

    @classmethod
    def from_config(cls, jc: JudgeConfig) -> JudgeClient:
        key = None
        if jc.api_key_env:
            key = os.environ.get(jc.api_key_env)
            if not key:
                raise JudgeError(
                    f"the judge's API key is read from the environment variable {jc.api_key_env}, which is not set "
                    "(set it, or set eval.judge.api_key_env to null for a server without keys)"
                )
        return cls(
            jc.base_url, jc.model, key, jc.temperature, jc.max_tokens, jc.timeout_s, jc.max_retries, jc.retry_wait_s
        )

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def complete(self, messages: list[dict]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        body["max_tokens"] = self.max_tokens
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_wait_s * attempt)
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                problem = f"HTTP {e.code} {e.reason}: {detail}"
                if e.code in RETRY_STATUS:
                    continue
                break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                problem = f"connection failed: {getattr(e, 'reason', e)}"
                continue
            except json.JSONDecodeError as e:
                raise JudgeError(f"judge endpoint {self.url} answered with something that is not JSON ({e})") from None
            try:
                return payload["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise JudgeError(
                    f"judge endpoint {self.url} answered without choices[0].message.content: {str(payload)[:300]}"
                ) from None
        raise JudgeError(f"judge endpoint {self.url} failed after {attempt + 1} attempt(s): {problem}")


def _read_partial(path: Path, model: str) -> dict[str, dict]:
    """Reviews already done by the same judge model (a rerun after a failure skips them)."""
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a killed run was writing
            if r.get("judge_model") == model:
                done[str(r["question_id"])] = r
    return done


def review_answers(records: list[dict], client: JudgeClient, reviews_path: Path, categories: list[str]) -> dict:
    """Review the answer records (question_id, prompt, text, answers, category) and write `reviews_path`.

    Returns {"model", "by_category": {cat: {n, reference_score, model_score, relative_score, unparsed}}, ...}.
    On an endpoint failure raises `JudgeError`; the reviews done so far stay in the partial file.
    """
    chosen = [r for r in records if not categories or r.get("category") in categories]
    partial = reviews_path.with_name(f".{reviews_path.name}.partial")
    done = _read_partial(partial, client.model)
    reviewed: list[dict] = []
    reviews_path.parent.mkdir(parents=True, exist_ok=True)
    answers = {str(r["question_id"]): r["text"] for r in chosen}
    done = {q: r for q, r in done.items() if answers.get(q) == r["answer"]}  # reviews of other answers are stale
    with open(partial, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in done.values())
        f.flush()
        for rec in chosen:
            prior = done.get(str(rec["question_id"]))
            if prior is not None:
                reviewed.append(prior)
                continue
            messages = review_messages(rec["prompt"], rec["answers"][0], rec["text"], rec.get("context"))
            try:
                content = client.complete(messages)
            except JudgeError as e:
                raise JudgeError(
                    f"{e}; {len(reviewed)} of {len(chosen)} answers reviewed (kept in {partial}, a rerun resumes)"
                ) from None
            scores = parse_scores(content)
            review = {
                "question_id": rec["question_id"],
                "category": rec.get("category"),
                "judge_model": client.model,
                "answer": rec["text"],
                "scores": list(scores) if scores else None,
                "content": content,
            }
            f.write(json.dumps(review) + "\n")
            f.flush()
            reviewed.append(review)
    partial.replace(reviews_path)
    return summarize(reviewed, client.model)


def summarize(reviews: list[dict], model: str) -> dict:
    """Per-category means of the reference and model scores and 100 * model / reference; unparsable replies
    are counted, never scored."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in reviews:
        by[r.get("category") or "default"].append(r)
    by["<all>"] = list(reviews)

    def stats(rs: list[dict]) -> dict:
        ok = [r["scores"] for r in rs if r["scores"]]
        ref = sum(s[0] for s in ok) / len(ok) if ok else 0.0
        mod = sum(s[1] for s in ok) / len(ok) if ok else 0.0
        return {
            "n": len(rs),
            "unparsed": len(rs) - len(ok),
            "reference_score": ref,
            "model_score": mod,
            "relative_score": 100.0 * mod / ref if ref else 0.0,
        }

    overall = stats(by.pop("<all>"))
    return {"model": model, "overall": overall, "by_category": {c: stats(rs) for c, rs in sorted(by.items())}}
