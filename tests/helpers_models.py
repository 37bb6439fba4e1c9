"""Test helpers for the conversion and evaluation stages: tiny random checkpoints, an evaluation workspace, and
a local stand-in for an OpenAI-compatible judge endpoint."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from llava_core.params import load_config
from tests.helpers_unit import LoopbackServer, base_params, write_params, write_png

EVAL_QUESTIONS = [
    {
        "question_id": 0,
        "image": "img/red.png",
        "text": "What color is the shape?",
        "answers": ["red"],
        "category": "color",
    },
    {
        "question_id": 1,
        "image": "img/blue.png",
        "text": "What color is the shape?",
        "answers": ["blue"],
        "category": "color",
    },
    {"question_id": 2, "image": "img/red.png", "text": "Is there a circle?", "answers": ["yes"], "category": "exists"},
    {
        "question_id": 3,
        "image": "img/blue.png",
        "text": "Which shape? A. circle B. square",
        "answers": ["B"],
        "task": "choice",  # grouped by `task` when there is no category
    },
    {
        "question_id": 4,
        "image": "img/red.png",
        "text": "Describe the image.",
        "answers": ["A red square on a light background."],
        "category": "detail",
        "suffix": "none",
    },
]


def write_checkpoint(cfg, tok, phase: str = "phase2", seed: int = 1) -> Path:
    """A checkpoint folder as training writes it: random weights, perturbed so no tensor keeps its init."""
    import torch

    from llava_core.model.llava import build_model, save_model

    model = build_model(cfg, len(tok), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    folder = cfg.checkpoint_dir(phase)
    save_model(model, folder)
    tok.save_pretrained(folder / "tokenizer")
    (folder / "train_summary.json").write_text(json.dumps({"image_patch_start_idx": 28}))
    return folder


def eval_workspace(root: Path, judge: dict | None = None, publish: dict | None = None) -> Path:
    """params.yaml for a workspace with five questions on two images (no source download needed)."""
    raw = root / "data" / "raw" / "evalset"
    write_png(raw / "img" / "red.png", (40, 30), (200, 30, 30))
    write_png(raw / "img" / "blue.png", (30, 40), (30, 30, 200))
    (raw / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in EVAL_QUESTIONS))
    params = base_params(root)
    params["eval"] = {
        "questions": "evalset/questions.jsonl",
        "image_folder": "evalset",
        "batch_size": 2,
        "max_new_tokens": 3,
        "metrics": {"color": "exact_match", "exists": "pope", "choice": "mc_accuracy", "detail": "anls"},
        "suffixes": {"choice": "multiple_choice"},
    }
    if judge is not None:
        params["eval"]["judge"] = judge
    if publish is not None:
        params["publish"] = publish
    return write_params(root, params)


def eval_config(root: Path, **kwargs):
    return load_config(eval_workspace(root, **kwargs))


def judge_reply(content: str) -> tuple[int, dict]:
    return 200, {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": content}}]}


class JudgeServer(LoopbackServer):
    """An OpenAI-compatible `/v1/chat/completions` on 127.0.0.1 in a thread; `reply(body, n)` -> (status, json)."""

    def __init__(self, reply) -> None:
        self.reply = reply
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, payload = server.reply(body, len(server.requests))
                data = json.dumps(payload).encode() if not isinstance(payload, str) else payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        super().__init__(Handler)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"
