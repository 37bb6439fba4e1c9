"""One run per stage output at a time, whoever starts it: the output's lock, the fingerprint of what a run of the
stage depends on, and the skip of a run that waited for another which made the same version.

Every stage function (download, convert, hdf5, validate, train, export, evaluate) runs through `run_guarded`: the
stage table's runners (the CLI, `llava-pipeline all`, and so DVC, which runs the CLI) and the Dagster assets call
it (the training asset, which starts the training process itself through Dagster Pipes, uses `guarded`). A run
takes the lock of the stage's primary output (`llava_core.atomic.output_lock`); a second run waits, logging which
process holds it. Once it has the lock, a run that waited compares its fingerprint (the settings the stage reads,
as dvc.yaml lists them, and the state of its inputs) with the one recorded beside the output by the run that made
it (`.<output>.run.json`): equal means the output is already what this run would make, and the run returns the
recorded result instead of redoing it. A run that did not wait always runs (asking for a stage is asking for it
to run). This module takes the stage (a `llava_core.pipeline.Stage`) as an argument: the stage table calls it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
import types
import typing
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llava_core.artifacts import RUN_RECORD, tree_state
from llava_core.atomic import LockWait, json_text, output_lock, write_json_atomic
from llava_core.config import PipelineConfig

log = logging.getLogger("llava_core")


def record_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(RUN_RECORD.format(name=out.name))


def read_record(out: Path) -> dict | None:
    """The record the last completed run wrote beside `out` (None: none, or unreadable)."""
    try:
        return json.loads(record_path(out).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def settings_view(cfg: PipelineConfig, s: Any, key: Any) -> dict:
    """The settings of one stage run: each params section the stage reads (`Stage.params`, which dvc.yaml's
    `params:` are generated from: a change DVC would re-run the stage for changes its fingerprint), by dotted name."""
    data = cfg.to_dict()
    view = {}
    for name in s.params(cfg, key):
        value: Any = data
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        view[name] = value
    return view


def _stat(path: Path) -> list[int] | None:
    """An output's identity: a new version is renamed into place, so its inode changes (a file rewritten in place
    changes its size or time; a folder's own time changes with any entry added inside, so only its inode counts)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_ino] if path.is_dir() else [st.st_ino, st.st_size, st.st_mtime_ns]


def input_state(path: Path) -> Any:
    """An input made by a stage: the fingerprint its run recorded, and its identity (a file or folder replaced since
    changes it); an input from outside the pipeline: `tree_state`."""
    record = read_record(path)
    if record is not None:
        return {"fingerprint": record.get("fingerprint"), "stat": _stat(Path(path))}
    return tree_state(path)


def fingerprint(cfg: PipelineConfig, s: Any, key: Any) -> str:
    """The digest of everything a run of stage `s` for `key` depends on (settings and inputs)."""
    parts = {
        "stage": s.name,
        "key": key,
        "settings": settings_view(cfg, s, key),
        # what dvc.yaml lists as its data: the other stages' outputs and what else it reads (tokenizer, configs)
        "inputs": {cfg.rel(p): input_state(p) for p in [*s.deps(cfg, key), *s.files(cfg, key)]},
    }
    if s.name == "download":  # a local folder's files (an S3 prefix is listed by the retrain planner only)
        from llava_core.data.sources import source_state

        parts["source"] = source_state(cfg, key, remote=False)
    return hashlib.sha256(json_text(parts).encode()).hexdigest()


def describe(s: Any, key: Any) -> str:
    return s.command if key is None else f"{s.command} {key}"


@dataclasses.dataclass
class Guard:
    """One stage run holding its output's lock: `current` is the recorded result when the run can be skipped."""

    cfg: PipelineConfig
    stage: Any  # a `llava_core.pipeline.Stage` (not imported: the stage table calls this module)
    key: Any
    out: Path
    fingerprint: str
    wait: LockWait
    current: dict | None

    def done(self, result: Any) -> None:
        """Record the completed run beside its output (while still holding the lock)."""
        if dataclasses.is_dataclass(result):
            result = dataclasses.asdict(result)
        write_json_atomic(
            record_path(self.out),
            {
                "stage": describe(self.stage, self.key),
                "fingerprint": self.fingerprint,
                "output": _stat(self.out),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "finished_at": time.time(),
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "result": json.loads(json_text(result)),
            },
        )


@contextmanager
def guarded(
    cfg: PipelineConfig,
    s: Any,
    key: Any = None,
    log_fn: Callable[[str], None] | None = None,
    since: float | None = None,
):
    """Hold the lock of stage `s`'s output for `key` (waiting for another run if needed); the guard says whether
    the output is already current (`guard.current`), and `guard.done(result)` records a completed run.

    `since` (a time.time()): the caller has been waiting since then in a way the lock does not see (a Dagster run
    queued for the `gpu` pool): an output made from the same inputs and settings after it is current too."""
    out = s.outs(cfg, key)[0]
    what = describe(s, key)
    with output_lock(out, what, log_fn) as wait:
        fp = fingerprint(cfg, s, key)  # under the lock: the inputs are what the last run left
        current = None
        record = read_record(out) if wait.waited_s is not None or since is not None else None
        if record and (wait.waited_s is not None or record.get("finished_at", 0) > since):
            if record.get("fingerprint") == fp and record.get("output") == _stat(out):
                current = record["result"]
                (log_fn or log.info)(
                    f"{what}: {out} was made by pid {record['pid']} on {record['host']} at {record['finished']} "
                    f"from the same inputs and settings while this run waited: up to date, not run again"
                )
        yield Guard(cfg, s, key, out, fp, wait, current)


def run_guarded(s: Any, cfg: PipelineConfig, key: Any, fn: Callable, **kwargs: Any) -> Any:
    """`fn(cfg, [key], **kwargs)`, stage `s`'s function, holding its output's lock; when this run waited for
    another which made the same version, that run's result instead (rebuilt as `fn`'s return type)."""
    with guarded(cfg, s, key) as guard:
        if guard.current is not None:
            return revive(typing.get_type_hints(fn)["return"], guard.current)
        result = fn(cfg, **kwargs) if key is None else fn(cfg, key, **kwargs)
        guard.done(result)
        return result


# --- a recorded result back as its dataclass --------------------------------------------------------------------
def revive(cls: Any, data: Any) -> Any:
    """`data` (a result as `Guard.done` recorded it) as an instance of the result type `cls`."""
    if data is None:
        return None
    if cls is Path:
        return Path(data)
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if origin in (typing.Union, types.UnionType):
        return revive(next(a for a in args if a is not type(None)), data)
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: revive(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data})
    if origin is dict and len(args) == 2:
        return {k: revive(args[1], v) for k, v in data.items()}
    return data
