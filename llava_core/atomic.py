"""Atomic outputs: every stage writes a temporary sibling and renames it into place when complete.

A killed stage never leaves a half-written file or folder at a final path that a later stage would read;
a failed one removes its temporaries and leaves the previous version intact; a full disk is reported as
`DiskFullError` naming the file being written, never as a bare `[Errno 28]`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llava_core.artifacts import LOCK_FILE


class DiskFullError(OSError):
    """The disk filled up while a stage wrote its temporary output; the final path was left as it was."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged(final: Path, *tmps: Path) -> Iterator[None]:
    """Around the writing of `final`'s new version into the temporary `tmps` (files or folders).

    On any failure the temporaries are removed (they are not resumable; a killed run's are removed by the next
    run) and `final` keeps whatever version it had. A full disk (ENOSPC, EDQUOT) becomes a `DiskFullError`
    that names the path being written, not a bare "[Errno 28] No space left on device".
    """
    try:
        yield
    except BaseException as e:
        for tmp in tmps:
            _remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                errno.ENOSPC,
                f"no space left on device while writing {tmps[0] if tmps else final}: {final} was not changed "
                f"(an earlier version there is kept); free some space and run the stage again ({e})",
            ) from e
        raise


def json_text(data: Any) -> str:
    """The JSON text every report and metadata file is written as (stable: sorted keys)."""
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary name and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with staged(path, tmp):
        tmp.write_text(json_text(data))
    tmp.replace(path)


def partial_dir(out: Path) -> Path:
    """An empty sibling `.<name>.partial` folder to build `out` in (a leftover from a killed run is removed).

    A previous version that a run killed between `replace_dir`'s two renames left set aside (`.<name>.old`,
    with nothing at `out`) is first put back, so a kill never loses the earlier artifact.
    """
    old = out.with_name(f".{out.name}.old")
    if old.is_dir() and not out.exists():
        old.rename(out)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a completed folder into place; the previous version is set aside and removed only afterwards."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


# --- one writer per output ---------------------------------------------------------------------------------------
# A lock file `.<name>.lock` beside each output, taken with flock: the kernel releases it when its holder ends,
# however it ends, so a killed run never blocks the next one. The file holds who has it (one JSON line); a clean
# release empties it, so a holder found there by the next taker is one that was killed. Lock files are never
# removed: a process waiting on one must not end up holding a lock on a file that another has replaced.
LOCK_LOG_INTERVAL_S = float(os.environ.get("LLAVA_LOCK_LOG_INTERVAL_S", "60"))
_log = logging.getLogger("llava_core")


def lock_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(LOCK_FILE.format(name=out.name))


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) an output's lock."""

    pid: int
    host: str
    command: str
    started: str  # ISO time
    what: str  # the stage, e.g. "hdf5 phase2"

    def describe(self) -> str:
        return f"{self.what} (pid {self.pid} on {self.host}, since {self.started}: {self.command})"


@dataclass(frozen=True)
class LockWait:
    """How the lock was taken: after waiting (`waited_s`) for another run, or from a killed holder (`stale`)."""

    path: Path
    waited_s: float | None  # None: it was free
    stale: Holder | None


def _read_holder(fd: int) -> Holder | None:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not text:
        return None
    try:
        return Holder(**json.loads(text))
    except (json.JSONDecodeError, TypeError):
        return Holder(0, "?", text[:200], "?", "?")


def _me(what: str) -> Holder:
    command = " ".join(sys.argv)[:500] or sys.executable
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return Holder(os.getpid(), socket.gethostname(), command, started, what)


@contextmanager
def output_lock(
    out: Path, what: str, log: Callable[[str], None] | None = None, every_s: float | None = None
) -> Iterator[LockWait]:
    """Hold the lock of `out` while writing it. A run that finds it held waits, logging which process holds it
    (again every `every_s`, default LLAVA_LOCK_LOG_INTERVAL_S = 60 s); a lock left by a killed process is free
    (the kernel released it) and is taken over, with a warning naming that process."""
    log = log or _log.info
    every = LOCK_LOG_INTERVAL_S if every_s is None else every_s
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t0 = time.monotonic()
        waited = _acquire(fd, Path(out), what, log, every)
        stale = _read_holder(fd)
        if stale is not None:
            _log.warning(
                f"{what}: took over the lock of {out} from {stale.describe()}, which ended without releasing it "
                "(killed?); its temporary files are cleaned up by this run"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(_me(what))) + "\n").encode(), 0)
        try:
            yield LockWait(path, time.monotonic() - t0 if waited else None, stale)
        finally:
            os.ftruncate(fd, 0)  # released cleanly: nobody is named as holder
    finally:
        os.close(fd)  # releases the lock


def _acquire(fd: int, out: Path, what: str, log: Callable[[str], None], every: float) -> bool:
    """Take the lock, polling (so that the wait can be reported); True when another run held it first."""
    t0 = time.monotonic()
    next_log, delay, waited = t0, 0.05, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return waited
        except BlockingIOError:
            waited = True
            now = time.monotonic()
            if now >= next_log:
                holder = _read_holder(fd)
                who = holder.describe() if holder else "another process"
                log(f"{what}: waiting for {out}: held by {who}; waited {now - t0:.0f} s")
                next_log = now + every
            time.sleep(delay)
            delay = min(1.0, delay * 2)
