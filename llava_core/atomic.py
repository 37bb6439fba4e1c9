"""Atomic outputs: every stage writes a temporary sibling and renames it into place when complete.

A killed stage never leaves a half-written file or folder at a final path that a later stage would read;
a failed one removes its temporaries and leaves the previous version intact; a full disk is reported as
`DiskFullError` naming the file being written, never as a bare `[Errno 28]`.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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
