"""Fault injection for the reliability and security tests: a SIGKILL at a chosen moment, a loopback S3 proxy that
fails requests, a small tmpfs for a full disk, the fake credentials, and a scan of a tree for them."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers_unit import LoopbackServer

# Fake credentials: each value is distinctive, so a scan that finds it has found a leak.
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIALLAVAFAKE7Q3ZK2M",
    "AWS_SECRET_ACCESS_KEY": "llava-fake-aws-secret-5b8e1f0c9d7a4e2b",
    "HF_TOKEN": "hf_llavaFakeToken9c41d7e2a05b",
    "OPENAI_API_KEY": "sk-llava-fake-judge-key-6e2f90b1c3d8",
}


def tree_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (or of `root` itself), by path relative to it; hidden temporaries
    (`.name.tmp`, `.name.partial`) are left out: no reader takes them."""
    root = Path(root)
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


# Hidden files beside an output that stay on purpose: a download's `.work` folder (it resumes), and each output's
# lock and the record of the run that made it (llava_core/stage_guard.py).
KEPT_SUFFIXES = (".work", ".lock", ".run.json")


def hidden_leftovers(final: Path) -> list[str]:
    """Temporaries beside `final` or inside it (what `KEPT_SUFFIXES` names stays on purpose)."""
    places = [final.parent] + ([final] if final.is_dir() else [])
    return sorted(
        p.name for d in places for p in d.iterdir() if p.name.startswith(".") and not p.name.endswith(KEPT_SUFFIXES)
    )


# --- SIGKILL at a chosen moment ---------------------------------------------------------------------------------
STEP_S = 0.002  # how long the process runs between two looks


def kill_when(cmd: list[str], ready: Callable[[], bool], log: Path, env: dict, timeout_s: float = 600) -> int:
    """Run `cmd` in its own process group and SIGKILL the whole group (launcher and children) at the first
    moment `ready()` holds.

    The group is frozen (SIGSTOP) for each look and runs `STEP_S` between looks (at a lower priority, so a busy
    machine slows it rather than the looks): the moment is caught however fast or loaded the machine is, as long
    as it lasts a few steps; a process that ends before it is a test failure. Returns the exit status.
    """
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["nice", "-n", "10", *cmd], env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            os.killpg(proc.pid, signal.SIGSTOP)
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None:
                raise AssertionError(f"{cmd[-2:]} ended (exit {proc.returncode}) before the moment to kill it; {log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{cmd[-2:]}: the moment to kill it did not come within {timeout_s} s; {log}")
            os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(STEP_S)
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(60)
    return proc.returncode


# --- a flaky S3 endpoint ----------------------------------------------------------------------------------------
FAULT_MODES = ("body cut off", "503 SlowDown", "500 InternalError")


class FlakyProxy(LoopbackServer):
    """A loopback HTTP proxy in front of an S3 endpoint that fails every `every`-th distinct request once.

    A request is (method, path and query, Range); its first arrival fails when its arrival index is a multiple
    of `every`, its retries pass, so how many fail does not depend on how threads interleave. A failed GET gets,
    in turn, a response whose body stops half way (the connection closed early), a 503 SlowDown and a 500
    InternalError (S3's XML error bodies); other requests the two errors.
    """

    def __init__(self, upstream: str, every: int = 3) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.every = every
        self.seen: set[tuple] = set()
        self.failed: list[tuple[str, tuple]] = []  # (mode, request)
        self.passed: list[tuple] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, cut: bool = False) -> None:
                self.send_response(status)
                length = str(len(body))
                for k, v in headers:
                    if k.lower() == "content-length" and self.command == "HEAD":
                        length = v  # a HEAD's length is the object's, with no body sent
                    elif k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", length)
                if cut:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body[: len(body) // 2] if cut else body)
                if cut:
                    self.wfile.flush()
                    self.close_connection = True

            def _handle(self) -> None:
                body = self._body()
                key = (self.command, self.path, self.headers.get("Range"))
                with proxy.lock:
                    first = key not in proxy.seen
                    proxy.seen.add(key)
                    fail = first and len(proxy.seen) % proxy.every == 0
                    modes = FAULT_MODES if self.command == "GET" else FAULT_MODES[1:]  # only a GET has a body to cut
                    mode = modes[sum(k[0] == self.command for _, k in proxy.failed) % len(modes)] if fail else None
                    if fail:
                        proxy.failed.append((mode, key))
                    else:
                        proxy.passed.append(key)
                if mode in ("503 SlowDown", "500 InternalError"):
                    status, code = mode.split(" ")
                    xml = f"<Error><Code>{code}</Code><Message>injected by the test</Message></Error>".encode()
                    self._send(int(status), [("Content-Type", "application/xml")], xml)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self._send(resp.status, resp.getheaders(), data, cut=mode == "body cut off")

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle  # noqa: N815 (http.server's names)

            def log_message(self, *args) -> None:
                pass

        super().__init__(Handler)


# --- a full disk ------------------------------------------------------------------------------------------------
@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (root only); the test is skipped, saying why, where mounting is not
    permitted."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"a full disk needs a small tmpfs, and mounting one is not permitted here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system holding `folder` but for about `leave` bytes; returns the filler (delete it to free)."""
    import shutil

    filler = folder / ".filler"
    todo = max(0, shutil.disk_usage(folder).free - leave)
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing is left to flush when it closes
        try:
            while todo > 0 or not leave:
                todo -= f.write(b"\0" * min(64 << 10, todo if leave else 64 << 10))
        except OSError:  # full
            pass
    return filler


# --- secrets ----------------------------------------------------------------------------------------------------
def find_secrets(root: Path, secrets: dict[str, str] = SECRETS) -> list[str]:
    """`<file>: <variable>` for every file under `root` that holds a secret's value (as written, or URL-quoted)."""
    import urllib.parse

    needles = {}
    for name, value in secrets.items():
        needles[value.encode()] = name
        needles[urllib.parse.quote(value, safe="").encode()] = name
    hits = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            hits += sorted({f"{p}: {name}" for needle, name in needles.items() if needle in data})
    return hits


# --- the faulted pipeline ---------------------------------------------------------------------------------------
# Each fault: the stage's command line, killed at a moment when it is writing, then run again.
FAULTS = {
    "download-first-run": "download, first run: killed while the images are written (nothing at the final path)",
    "download-refetch": "download --refetch over a finished folder: killed while it writes the new copy",
    "convert-first-run": "convert, first run: killed while the jsonl is written",
    "convert-rerun": "convert over a finished jsonl: killed while the new one is written",
    "hdf5-rerun": "hdf5 phase2 over a finished folder: killed while the shuffled shards are written",
    "train-phase1": "train phase1, first run: killed while it saves the step-2 checkpoint",
    "train-phase2": "train phase2, first run: killed after the step-2 checkpoint, step 3 already logged",
    "export-rerun": "export over a finished models/hf: killed while the model is written",
    "evaluate-rerun": "evaluate over a finished report: killed while the judge reviews the third answer",
}


def _count(folder: Path, pattern: str) -> int:
    return sum(1 for _ in folder.glob(pattern)) if folder.is_dir() else 0


def _lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_bytes().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


class FaultedPipeline:
    """The small pipeline (64 + 64 records, 4 x 7 eval questions, one short epoch per phase) run stage by stage
    from the command line, each stage SIGKILLed once at the moment `FAULTS` names and run again, with fake
    credentials in the environment and a loopback judge that checks the key it is sent.

    `facts[fault]` records what each fault left and what the re-run gave; the tests assert on them. A download and
    a conversion run uninterrupted in `ref/` are the reference for those stages; the other stages' reference is
    their own uninterrupted run before the killed re-run.
    """

    JUDGE_MODEL = "judge-test"

    def __init__(self, root: Path) -> None:
        import sys

        import yaml

        from tests.conftest import e2e_params
        from tests.helpers_models import JudgeServer

        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.judge = JudgeServer(self._reply)
        self.judge.httpd.handle_error = lambda *a: None  # the killed client's socket: nothing to report
        self.block_at: int | None = None
        self.release = threading.Event()
        self.facts: dict[str, dict] = {}
        self.params = e2e_params(root / "ws")
        raw = yaml.safe_load(self.params.read_text())
        for phase in ("phase1", "phase2"):
            raw["train"][phase].update(save_every=1, log_every=1)
        raw["hdf5"]["phase2"]["shard_size"] = 16
        self._raw = raw
        bindir = str(Path(sys.executable).parent)
        self.cli = [str(Path(bindir) / "llava-pipeline"), "--params", str(self.params)]
        self.env = {**os.environ, **SECRETS, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}

    def _reply(self, body: dict, n: int):
        from tests.helpers_models import judge_reply

        if self.block_at is not None and n == self.block_at:
            self.release.wait(600)  # holds this review until the test has killed the client
        return judge_reply("8 6\nBoth answers address the question.")

    def __enter__(self) -> FaultedPipeline:
        import yaml

        self.judge.__enter__()
        self._raw["eval"]["judge"] = {
            "base_url": self.judge.base_url,
            "model": self.JUDGE_MODEL,
            "api_key_env": "OPENAI_API_KEY",
            "max_retries": 0,
            "retry_wait_s": 0.0,
        }
        self.params.write_text(yaml.safe_dump(self._raw, sort_keys=False))
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.judge.__exit__(*exc)

    # one fault: kill the command at `ready`, look at `final`, run the stage again in this process
    def fault(self, name: str, args: list[str], ready: Callable[[], bool], final: Path, rerun: Callable) -> dict:
        before = tree_digests(final) if final.exists() else None
        code = kill_when([*self.cli, *args], ready, self.logs / f"{name}.log", self.env)
        after = tree_digests(final) if final.exists() else None
        state = "absent" if after is None else "intact" if after == before else "changed"
        rerun()
        fact = {
            "exit": code,
            "after_kill": state,
            "left_after_rerun": hidden_leftovers(final),
            "before": before,
            "done": tree_digests(final),
        }
        fact["identical"] = before is None or fact["done"] == before
        self.facts[name] = fact
        return fact

    def records(self, name: str, expected: int, ids: list) -> None:
        """What the re-run of `name` holds: `expected` records, found as `ids` (none lost, none twice)."""
        self.facts[name].update(expected=expected, found=len(set(ids)), duplicated=len(ids) - len(set(ids)))

    def run(self) -> None:
        from unittest import mock

        with mock.patch.dict(os.environ, SECRETS):
            self._data_stages()
            self._training()
            self._export_and_evaluate()

    def _data_stages(self) -> None:
        from llava_core.data.convert import convert
        from llava_core.data.hdf5_writer import build_hdf5
        from llava_core.data.sources import download
        from llava_core.params import load_config
        from tests.conftest import e2e_params

        cfg = load_config(self.params)
        ref = load_config(e2e_params(self.root / "ref"))  # the same source and datasets, never interrupted
        download(ref, "synthetic_shapes")
        convert(ref, "shapes_instruct")

        raw = cfg.raw_dir("synthetic_shapes")
        images = raw.with_name(f".{raw.name}.partial") / "images"
        for name, args in (("download-first-run", []), ("download-refetch", ["--refetch"])):
            self.fault(
                name,
                ["download", "synthetic_shapes", *args],
                lambda: _count(images, "*.png") >= 5,
                raw,
                lambda a=args: download(cfg, "synthetic_shapes", refetch=bool(a)),
            )
            self.facts[name]["identical"] &= self.facts[name]["done"] == tree_digests(ref.raw_dir("synthetic_shapes"))
            files = json.loads((raw / "manifest.json").read_text())["files"]
            self.records(name, len(tree_digests(ref.raw_dir("synthetic_shapes"))) - 1, [f["path"] for f in files])

        convert(cfg, "shapes_pretrain")
        jsonl = cfg.jsonl_path("shapes_instruct")
        tmp = jsonl.with_name(f".{jsonl.name}.tmp")
        for name in ("convert-first-run", "convert-rerun"):
            self.fault(name, ["convert", "shapes_instruct"], tmp.exists, jsonl, lambda: convert(cfg, "shapes_instruct"))
            self.facts[name]["identical"] &= jsonl.read_bytes() == ref.jsonl_path("shapes_instruct").read_bytes()
            ids = [json.loads(line)["id"] for line in jsonl.read_text().splitlines()]
            self.records(name, cfg.sources["synthetic_shapes"].options["num_instruct"], ids)

        build_hdf5(cfg, "phase1")
        build_hdf5(cfg, "phase2")  # the uninterrupted run the killed one must not disturb, nor differ from
        out = cfg.hdf5_dir("phase2")
        shards = out.with_name(f".{out.name}.partial")
        self.fault(
            "hdf5-rerun",
            ["hdf5", "phase2"],
            lambda: _count(shards, "data-*.h5") >= 1,
            out,
            lambda: build_hdf5(cfg, "phase2"),
        )
        params = json.loads((out / "data_params.json").read_text())
        self.records("hdf5-rerun", _lines(jsonl), list(range(params["examples"])))

    def _training(self) -> None:
        from llava_core.artifacts import RUN_STATS, TRAIN_SUMMARY
        from llava_core.params import load_config
        from llava_core.training.checkpointing import step_checkpoints, work_dir
        from llava_core.training.launch import train
        from llava_core.training.observe import read_metrics

        cfg = load_config(self.params)
        moments = {
            "phase1": lambda w: (w / ".step-00000002.tmp").is_dir(),
            "phase2": lambda w: (w / "step-00000002").is_dir() and _lines(w / "metrics.jsonl") >= 3,
        }
        for phase, moment in moments.items():
            work = work_dir(cfg, phase)
            resume_at: list[int] = []

            def rerun(phase=phase, work=work, resume_at=resume_at) -> None:
                saved = step_checkpoints(work)
                resume_at.append(int(saved[-1].name.split("-")[1]) if saved else 0)
                train(cfg, phase)

            fact = self.fault(
                f"train-{phase}", ["train", phase], lambda w=work, m=moment: m(w), cfg.checkpoint_dir(phase), rerun
            )
            out = cfg.checkpoint_dir(phase)
            summary = json.loads((out / TRAIN_SUMMARY).read_text())
            steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
            resumed_from = json.loads((out / RUN_STATS).read_text())["resumed_from_step"]  # how the run went
            fact.update(resumed_from=resumed_from, resume_point=resume_at[0], steps=summary["steps"])
            self.records(f"train-{phase}", summary["steps"], steps)
            fact["identical"] = steps == list(range(1, summary["steps"] + 1)) and not work.exists()

    def _export_and_evaluate(self) -> None:
        from llava_core.evaluation.evaluate import evaluate, judge_answers
        from llava_core.model.hf import export_hf
        from llava_core.params import load_config

        cfg = load_config(self.params)
        export_hf(cfg)
        hf = cfg.path("models") / "hf"
        partial = hf.with_name(".hf.partial")
        written = partial / "config.json"  # the model is being written (the weights follow, ~0.2 s)
        self.fault("export-rerun", ["export"], written.exists, hf, lambda: export_hf(cfg))
        self.records("export-rerun", len(self.facts["export-rerun"]["before"]), list(tree_digests(hf)))

        evaluate(cfg)  # answers, then the judge's reviews of all of them
        reports = cfg.path("reports")
        questions = _lines(reports / "answers.jsonl")
        seen = len(self.judge.requests)
        self.block_at = seen + 3
        before_rerun: list[int] = []

        def rerun() -> None:
            self.release.set()
            partial_reviews = _lines(reports / ".reviews.jsonl.partial")
            before_rerun.extend([partial_reviews, len(self.judge.requests)])
            judge_answers(cfg)  # reviews the kept answers, resuming from the partial reviews

        fact = self.fault("evaluate-rerun", ["evaluate"], lambda: len(self.judge.requests) >= seen + 3, reports, rerun)
        kept, requests_before = before_rerun
        fact.update(reviews_kept=kept, rerun_requests=len(self.judge.requests) - requests_before, questions=questions)
        reviews = [json.loads(line)["question_id"] for line in (reports / "reviews.jsonl").read_text().splitlines()]
        self.records("evaluate-rerun", questions, reviews)
        keys = {r["headers"].get("Authorization") for r in self.judge.requests}
        fact["judge_saw_the_key"] = keys == {f"Bearer {SECRETS['OPENAI_API_KEY']}"}


def fault_figures(facts: dict[str, dict]) -> dict:
    """What docs/reliability.md quotes from the faulted pipeline."""
    return {
        "sigkills": len(facts),
        "records": sum(f["expected"] for f in facts.values()),
        "lost": sum(f["expected"] - f["found"] for f in facts.values()),
        "duplicated": sum(f["duplicated"] for f in facts.values()),
    }
