"""The image checks' cache: what decoding a file found, keyed by the SHA-256 of its bytes and the checker settings.

Decoding every image again on every run is the costliest part of an image check (milliseconds for a photo against
a fraction of one to hash it). The cache keeps one row per (content digest, settings): the decoded format, size and
frame count, or the rejection the decode gave (undecodable, too large). The key is the content, never a path or a
modification time: a file rewritten with other bytes is decoded again, a copy of a known file under another name
is not. The settings are what a decode's verdict depends on (this module's `VERSION`, Pillow's version and its
decompression-bomb limit); the checker's `min_size` is compared with the cached size, so changing it reuses the
decodes.

One SQLite database in write-ahead-log mode, `<image root>/image-check-cache/checks.sqlite` (docs/stages.md;
ignored by git and DVC): any number of processes read it at once and take turns to write (two HDF5 writers, their
worker processes, a conversion). A cache that cannot be opened or written (read-only image root, full disk, a
damaged file) is switched off with a warning: the checks then decode, nothing else changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from llava_core.artifacts import IMAGE_CHECK_CACHE

VERSION = 1  # raise when what a decode decides changes (a new rejection, another field)
DB_NAME = "checks.sqlite"
QUERY_BATCH = 500  # digests per SELECT (below SQLite's bound on parameters)
WRITE_EVERY = 256  # single checks buffered before one write transaction
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoded:
    """What decoding one file's bytes found: its format, size and frames, or the decode's rejection."""

    format: str | None = None
    width: int = 0
    height: int = 0
    frames: int = 1
    reason: str | None = None  # image_undecodable / image_too_large
    detail: str = ""


def settings() -> str:
    """The settings a cached verdict holds for (read at each use: a test or a user may change Pillow's limit)."""
    return f"v{VERSION} pillow {Image.__version__} max_image_pixels {Image.MAX_IMAGE_PIXELS}"


def digest(path: str) -> bytes:
    """SHA-256 of the file's bytes (hashlib releases the GIL while it hashes)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def cache_folder(image_root: Path) -> Path:
    return Path(image_root) / IMAGE_CHECK_CACHE


SCHEMA = """CREATE TABLE IF NOT EXISTS checks (
    digest BLOB NOT NULL, settings TEXT NOT NULL, format TEXT, width INTEGER, height INTEGER, frames INTEGER,
    reason TEXT, detail TEXT, PRIMARY KEY (digest, settings)) WITHOUT ROWID"""


SETUP_WAIT_S = 60.0  # how long opening the cache retries while other processes set it up


def _set_up(conn: sqlite3.Connection) -> None:
    """WAL mode and the table. Switching the journal mode takes the database's exclusive lock, and SQLite answers
    "database is locked" at once, without its busy timeout, while another process opens it the same moment (two
    writer processes starting together): retried with a growing pause, up to SETUP_WAIT_S."""
    deadline, pause = time.monotonic() + SETUP_WAIT_S, 0.01
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
            conn.execute("PRAGMA synchronous=NORMAL")  # a cache: a power cut may lose the last rows, never corrupt
            conn.execute(SCHEMA)
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(1.0, pause * 2)


class ImageCheckCache:
    """Verdicts by content digest, shared by processes; a connection per process, opened at first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.hits = self.misses = 0
        self.disabled = False
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        self._pending: dict[bytes, Decoded] = {}
        self._lock = threading.Lock()  # the writer checks images in a thread, a conversion in its main thread

    def __getstate__(self) -> dict:  # sent to a spawned worker: without the connection
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])

    def _connection(self) -> sqlite3.Connection | None:
        if self.disabled:
            return None
        if self._conn is None or self._pid != os.getpid():  # never share a connection across a fork
            self.folder.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.folder / DB_NAME, timeout=120, isolation_level=None, check_same_thread=False)
            _set_up(conn)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _off(self, error: Exception) -> None:
        log.warning("image check cache in %s switched off (images are decoded instead): %s", self.folder, error)
        self.disabled, self._conn, self._pending = True, None, {}

    def get(self, digests: list[bytes]) -> dict[bytes, Decoded]:
        """The cached verdicts among `digests` (counted as hits; the others as misses)."""
        found: dict[bytes, Decoded] = {}
        with self._lock:
            try:
                conn = self._connection()
                if conn is not None:
                    key = settings()
                    unique = list(dict.fromkeys(digests))
                    for i in range(0, len(unique), QUERY_BATCH):
                        part = unique[i : i + QUERY_BATCH]
                        rows = conn.execute(
                            "SELECT digest, format, width, height, frames, reason, detail FROM checks "
                            f"WHERE settings = ? AND digest IN ({','.join('?' * len(part))})",
                            [key, *part],
                        )
                        found.update((r[0], Decoded(*r[1:])) for r in rows)
            except (sqlite3.Error, OSError) as e:
                self._off(e)
            wanted = set(digests)
            found.update((d, v) for d, v in self._pending.items() if d in wanted)
        hit = sum(d in found for d in digests)
        self.hits += hit
        self.misses += len(digests) - hit
        return found

    def get_one(self, key: bytes) -> Decoded | None:
        """`get` for one digest (a conversion checks one record at a time)."""
        with self._lock:
            found = self._pending.get(key)
            try:
                conn = self._connection()
                if found is None and conn is not None:
                    row = conn.execute(
                        "SELECT format, width, height, frames, reason, detail FROM checks WHERE settings = ? AND digest = ?",
                        (settings(), key),
                    ).fetchone()
                    found = Decoded(*row) if row is not None else None
            except (sqlite3.Error, OSError) as e:
                self._off(e)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, verdicts: dict[bytes, Decoded], flush: bool = True) -> None:
        """Remember `verdicts`; written now (one transaction) or, without `flush`, once enough are waiting."""
        with self._lock:
            self._pending.update(verdicts)
            if flush or len(self._pending) >= WRITE_EVERY:
                self._write()

    def flush(self) -> None:
        with self._lock:
            self._write()

    def _write(self) -> None:
        if not self._pending:
            return
        key = settings()
        rows = [(d, key, v.format, v.width, v.height, v.frames, v.reason, v.detail) for d, v in self._pending.items()]
        try:
            conn = self._connection()
            if conn is None:
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR REPLACE INTO checks VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._pending = {}
        except (sqlite3.Error, OSError) as e:
            self._off(e)

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
