"""Shared test helpers: params files for temporary workspaces, small images, conversations."""

from __future__ import annotations

import copy
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml
from PIL import Image

PROJECT = Path(__file__).resolve().parents[1]
PROJECT_PARAMS = PROJECT / "params.yaml"
CPU_ACCELERATE = str(PROJECT / "configs" / "accelerate" / "cpu.yaml")
TINY_TOKENIZER = str(PROJECT / "llava_core" / "resources" / "tiny_tokenizer")


SMALL_SOURCE = {"num_pretrain": 20, "num_instruct": 20, "num_eval_images": 2}


def base_params(root: Path | str, small: bool = True, **options) -> dict:
    """The project's params.yaml as a dict, pointed at `root`; with `small`, a source of a few dozen records."""
    raw = yaml.safe_load(PROJECT_PARAMS.read_text())
    params = copy.deepcopy(raw)
    params["workspace"]["root"] = str(root)
    opts = params["sources"]["synthetic_shapes"]["options"]
    if small:
        opts.update(SMALL_SOURCE)
    opts.update(options)
    for phase in ("phase1", "phase2"):
        params["train"][phase]["accelerate_config"] = CPU_ACCELERATE
    return params


def write_params(folder: Path, params: dict, name: str = "params.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def png_bytes(size: tuple[int, int] = (32, 32), color=(200, 30, 30), noise: bool = False) -> bytes:
    if noise:
        import numpy as np

        arr = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGB")
    else:
        img = Image.new("RGB", size, color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, size: tuple[int, int] = (32, 32), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(size, color))
    return path


def write_truncated_png(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    """A PNG whose header is intact but whose pixel data stops half way (opens, fails to decode)."""
    data = png_bytes(size, noise=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def conv(*turns: str, image: bool = True) -> list[dict]:
    """Alternating human/gpt turns; the first human turn gets `<image>\\n` when `image`."""
    out = []
    for k, value in enumerate(turns):
        if k == 0 and image:
            value = "<image>\n" + value
        out.append({"from": "human" if k % 2 == 0 else "gpt", "value": value})
    return out


def loss_runs(mask) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of loss_mask == 1."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


class LoopbackServer:
    """An HTTP server on 127.0.0.1 in a thread, for the handler class a subclass builds; a context manager."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
