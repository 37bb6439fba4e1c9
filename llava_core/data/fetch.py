"""Transfers for stage 1: HTTP(S) with resume, S3 through boto3, Hugging Face Hub snapshots, safe archive extraction.

Each fetcher writes into the download's temporary folder; `sources.download` renames it into place. Anything
that must survive an interrupted run (a half-downloaded `.part` file, the Hub's own resume cache) lives in the
source's work folder, which is removed only after a successful download.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import lzma
import math
import os
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from llava_core.artifacts import sha256_file

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
HEX40 = re.compile(r"[0-9a-f]{40}")
HEX64 = re.compile(r"[0-9a-f]{64}")
MIB = 1 << 20


# --- archives ---------------------------------------------------------------------------------------------
class UnsafeArchiveError(ValueError):
    """An archive member that would land outside the target folder; nothing of the archive is extracted."""


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _inside(root: Path, rel: str) -> bool:
    """True when `rel` (a relative path inside an archive or bucket) stays under `root` once resolved."""
    if not rel or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel) or ".." in PurePosixPath(rel).parts:
        return False
    root = root.resolve()
    path = (root / rel).resolve()
    return path == root or root in path.parents


def _check_member(archive: Path, target: Path, name: str, link: str | None = None, hard: bool = False) -> None:
    def refuse(why: str) -> None:
        raise UnsafeArchiveError(f"{archive.name}: refused, member {name!r} {why}; nothing was extracted")

    if not _inside(target, name.replace("\\", "/")):
        refuse("would be written outside the target folder (absolute path or '..')")
    if link is not None:
        if link.startswith("/") or os.path.isabs(link):
            refuse(f"is a link to the absolute path {link!r}")
        # a symlink resolves against its own folder, a tar hard link against the archive root
        rel = link if hard else (PurePosixPath(name).parent / link).as_posix()
        if not _inside(target, rel):
            refuse(f"is a link leaving the target folder ({link!r})")


class CorruptArchiveError(ValueError):
    """An archive that cannot be read to its end (damaged, truncated, or not the format its name says)."""


def extract_archive(archive: Path, target: Path) -> list[str]:
    """Extract a zip, tar or tar.gz into `target` after checking every member; returns the member names.

    Absolute paths, `..` components, links that point outside `target` and special files are refused with an
    `UnsafeArchiveError` before anything is written. A damaged or truncated archive is a `CorruptArchiveError`
    naming it (a tar is read to its end before anything is written; a zip member that fails its CRC stops the
    extraction, and the caller discards the partial folder).
    """
    try:
        return _extract_archive(archive, target)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise CorruptArchiveError(f"{archive.name}: damaged or truncated archive ({type(e).__name__}: {e})") from None


def _extract_archive(archive: Path, target: Path) -> list[str]:
    target.mkdir(parents=True, exist_ok=True)
    lower = archive.name.lower()
    if lower.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            links = {}
            for info in infos:
                is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                link = zf.read(info).decode("utf-8", "replace") if is_link else None
                _check_member(archive, target, info.filename, link)
                if link is not None:
                    links[info.filename] = link
            for info in infos:
                if info.filename in links:
                    dest = target / info.filename
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(links[info.filename], dest)
                else:
                    zf.extract(info, target)
            return [i.filename for i in infos]
    if lower.endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                    raise UnsafeArchiveError(f"{archive.name}: refused, member {m.name!r} is a special file")
                _check_member(archive, target, m.name, m.linkname if (m.issym() or m.islnk()) else None, m.islnk())
            tf.extractall(target, members=members, filter="data")
            return [m.name for m in members]
    raise ValueError(f"{archive.name}: not a supported archive; valid suffixes: {list(ARCHIVE_SUFFIXES)}")


def extract_all(folder: Path) -> list[Path]:
    """Extract every archive under `folder` next to itself and remove the archive; returns the archives done."""
    done = []
    for archive in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and is_archive(p)):
        extract_archive(archive, archive.parent)
        archive.unlink()
        done.append(archive)
    return done


def _progress(total: int | None, desc: str, initial: int = 0) -> tqdm:
    # disable=None: bars on a terminal, silent in logs and tests
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None)


# --- HTTP(S) ----------------------------------------------------------------------------------------------
def http_filename(url: str, options: dict) -> str:
    name = options.get("filename") or urllib.parse.unquote(PurePosixPath(urllib.parse.urlparse(url).path).name)
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{url}: cannot name the downloaded file; set options.filename")
    return name


def http_download(url: str, part: Path, retries: int = 5, timeout_s: float = 60.0, backoff_s: float = 1.0) -> Path:
    """Download `url` into `part`, resuming from its current size with a Range request.

    A server that ignores the range (200 instead of 206) restarts the file; connection errors, short reads,
    429 and 5xx are retried with exponential backoff, each retry resuming where the last one stopped.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                if (
                    have
                    and resp.status == 206
                    and not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-")
                ):
                    raise ValueError(f"{url}: unexpected Content-Range {resp.headers.get('Content-Range')!r}")
                append = bool(have) and resp.status == 206
                start = have if append else 0
                length = resp.headers.get("Content-Length")
                total = start + int(length) if length is not None else None
                with open(part, "ab" if append else "wb") as f, _progress(total, part.name[:-5], start) as bar:
                    while block := resp.read(MIB):
                        f.write(block)
                        bar.update(len(block))
                if total is not None and part.stat().st_size != total:
                    raise http.client.IncompleteRead(b"", total - part.stat().st_size)
                return part
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to fetch: the .part is already whole (verified by sha256)
                return part
            if e.code != 429 and e.code < 500:
                raise ConnectionError(f"{url}: HTTP {e.code} {e.reason}") from None
            last = e
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as e:
            last = e
        if attempt < retries:
            time.sleep(backoff_s * 2**attempt)
    raise ConnectionError(f"{url}: download failed after {retries + 1} attempts ({last!r}); rerun to resume")


def fetch_http(location: str, sha256: str, options: dict, dest: Path, work: Path) -> Path:
    """One URL -> `dest/<filename>`, resumable through `work/<filename>.part`, sha256-verified."""
    name = http_filename(location, options)
    part = work / f"{name}.part"
    http_download(
        location,
        part,
        retries=int(options.get("retries", 5)),
        timeout_s=float(options.get("timeout_s", 60.0)),
        backoff_s=float(options.get("backoff_s", 1.0)),
    )
    got = sha256_file(part)
    if got != sha256.lower():
        part.unlink()
        raise ValueError(f"{location}: sha256 mismatch: expected {sha256.lower()}, got {got} (partial file removed)")
    final = dest / name
    part.replace(final)
    return final


# --- S3 ---------------------------------------------------------------------------------------------------
def parse_s3_url(location: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/"); the prefix is taken as a folder."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{location!r}: an s3 source location must look like s3://bucket/prefix")
    prefix = parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return parsed.netloc, prefix


def s3_client(options: dict):
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": int(options.get("max_attempts", 5))})
    return boto3.session.Session().client(
        "s3", endpoint_url=options.get("endpoint_url"), region_name=options.get("region"), config=config
    )


def list_s3(client, bucket: str, prefix: str) -> list[dict]:
    """Every object under the prefix (all pages): [{key, size, etag, last_modified}]."""
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            modified = obj.get("LastModified")
            out.append(
                {
                    "key": obj["Key"],
                    "size": obj["Size"],
                    "etag": obj.get("ETag", "").strip('"'),
                    "last_modified": modified.isoformat() if modified else None,
                }
            )
    return out


def listing_digest(objects: list[dict]) -> str:
    """One digest of a prefix listing: any new, removed or changed object (size, ETag, time) changes it."""
    rows = sorted((o["rel"], o["size"], o["etag"], o["last_modified"]) for o in objects)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def s3_source_objects(client, location: str, patterns: list[str]) -> list[dict]:
    """The objects an s3 source takes from `s3://bucket/prefix`: folder markers left out, `patterns` (globs on
    the key relative to the prefix) applied; each with its relative path `rel`."""
    bucket, prefix = parse_s3_url(location)
    objects = []
    for obj in list_s3(client, bucket, prefix):
        rel = obj["key"][len(prefix) :]
        if not rel or rel.endswith("/"):
            continue  # folder markers
        if patterns and not any(fnmatch.fnmatch(rel, p) for p in patterns):
            continue
        objects.append({**obj, "rel": rel})
    return objects


def _md5_parts(path: Path, part_size: int) -> str:
    digests = []
    with open(path, "rb") as f:
        while block := f.read(part_size):
            digests.append(hashlib.md5(block).digest())
    return hashlib.md5(b"".join(digests)).hexdigest() + f"-{len(digests)}"


def etag_matches(path: Path, etag: str, part_sizes: tuple[int, ...] = ()) -> bool | None:
    """Compare a file to an S3 ETag: True/False, or None when the ETag cannot be recomputed.

    A single-part ETag is the MD5 of the bytes. A multipart one (`<md5>-<N>`) is the MD5 of the parts' MD5s,
    which depends on the uploader's part size: the likely sizes giving N parts are tried (the configured
    one, the common client defaults, and ceil(size/N) rounded to a MiB); none matching gives None, and
    the caller relies on the size alone.
    """
    etag = etag.strip('"').lower()
    if re.fullmatch(r"[0-9a-f]{32}", etag):
        h = hashlib.md5()
        with open(path, "rb") as f:
            while block := f.read(MIB):
                h.update(block)
        return h.hexdigest() == etag
    m = re.fullmatch(r"([0-9a-f]{32})-(\d+)", etag)
    if not m:
        return None  # e.g. SSE-KMS objects: not an MD5
    n, size = int(m.group(2)), path.stat().st_size
    guesses = [*part_sizes, 8 * MIB, 5 * MIB, 16 * MIB, 15 * MIB, 64 * MIB, 100 * MIB]
    if n:
        guesses.append(math.ceil(size / n / MIB) * MIB)
    for ps in dict.fromkeys(g for g in guesses if g > 0):
        if max(1, math.ceil(size / ps)) == n and _md5_parts(path, ps) == etag:
            return True
    return None


def fetch_s3(location: str, patterns: list[str], options: dict, dest: Path) -> list[dict]:
    """Every object under `s3://bucket/prefix` (filtered by glob patterns on the relative key) -> `dest`.

    Large objects are fetched in parts (TransferConfig multipart_threshold/chunksize); each file is checked
    against the listed size and ETag.
    """
    from boto3.s3.transfer import TransferConfig

    bucket, prefix = parse_s3_url(location)
    client = s3_client(options)
    chunk = int(options.get("multipart_chunksize", 8 * MIB))
    transfer = TransferConfig(
        multipart_threshold=int(options.get("multipart_threshold", 8 * MIB)),
        multipart_chunksize=chunk,
        max_concurrency=int(options.get("max_concurrency", 4)),
    )
    objects = s3_source_objects(client, location, patterns)
    for obj in objects:
        if not _inside(dest, obj["rel"]):
            raise ValueError(f"s3://{bucket}/{obj['key']}: key would be written outside the source folder")
    if not objects:
        raise FileNotFoundError(f"{location}: no objects found (patterns: {patterns or 'all'})")
    with _progress(sum(o["size"] for o in objects), f"s3://{bucket}/{prefix}") as bar:
        for obj in objects:
            path = dest / obj["rel"]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["key"], str(path), Config=transfer, Callback=bar.update)
            where = f"s3://{bucket}/{obj['key']}"
            if path.stat().st_size != obj["size"]:
                raise ValueError(f"{where}: size mismatch: listed {obj['size']}, got {path.stat().st_size}")
            if etag_matches(path, obj["etag"], (chunk,)) is False:
                raise ValueError(f"{where}: ETag mismatch (listed {obj['etag']}): the download is corrupt")
    return objects


# --- Hugging Face Hub -------------------------------------------------------------------------------------
HF_REPO_TYPES = ("dataset", "model", "space")


def check_hf_revision(repo: str | None, revision: str | None) -> None:
    if not revision or not HEX40.fullmatch(revision):
        raise ValueError(
            f"hf source {repo!r}: revision must be pinned to a full commit sha (40 hex characters), got "
            f"{revision!r}; a branch or tag can move (find the sha on the repository's 'Files and versions' page)"
        )


def hf_snapshot_args(repo: str, revision: str | None, patterns: list[str], options: dict, local_dir: Path) -> dict:
    """The keyword arguments for `huggingface_hub.snapshot_download`; the token comes from HF_TOKEN."""
    check_hf_revision(repo, revision)
    repo_type = options.get("repo_type", "dataset")
    if repo_type not in HF_REPO_TYPES:
        raise ValueError(f"hf source {repo!r}: repo_type {repo_type!r}; valid: {list(HF_REPO_TYPES)}")
    return {
        "repo_id": repo,
        "repo_type": repo_type,
        "revision": revision,
        "allow_patterns": list(patterns) or None,
        "token": os.environ.get("HF_TOKEN") or None,
        "local_dir": str(local_dir),
    }


def fetch_hf(repo: str, revision: str | None, patterns: list[str], options: dict, dest: Path, work: Path) -> None:
    """A pinned snapshot of a Hub repository -> `dest` (the Hub's resume cache stays in `work`)."""
    from huggingface_hub import snapshot_download

    local = work / "hf"
    snapshot_download(**hf_snapshot_args(repo, revision, patterns, options, local))
    for entry in local.iterdir():
        if entry.name != ".cache":
            shutil.move(str(entry), str(dest / entry.name))
