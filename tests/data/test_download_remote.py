"""Remote source kinds: S3 on a real loopback endpoint (moto server), HTTP with resume, safe archives, HF args."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
import uuid
import zipfile
from pathlib import Path

import pytest

from llava_core.artifacts import MANIFEST
from llava_core.config import ConfigError
from llava_core.data.fetch import UnsafeArchiveError, etag_matches, extract_archive, hf_snapshot_args, http_download
from llava_core.data.sources import download
from llava_core.params import load_config
from tests.helpers_unit import base_params, png_bytes, write_params

MIB = 1 << 20


def cfg_with(tmp_path: Path, name: str, source: dict):
    params = base_params(tmp_path / "ws")
    params["sources"][name] = source
    return load_config(write_params(tmp_path, params))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- S3 -----------------------------------------------------------------------------------------------------
@pytest.fixture
def bucket(s3_endpoint, aws_env):
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    name = f"raw-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    big = bytes(range(256)) * (6 * MIB // 256) + b"tail"  # 6 MiB + 4 bytes: uploaded in two 5 MiB parts
    objects = {
        "llava/data.json": json.dumps([{"id": 1}]).encode(),
        "llava/images/a.png": png_bytes(),
        "llava/images/sub/b.png": png_bytes(color=(1, 2, 3)),
        "llava/big.bin": big,
        "other/skip.txt": b"not under the prefix",
    }
    for key, data in objects.items():
        client.upload_fileobj(
            io.BytesIO(data),
            name,
            key,
            Config=TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB),
        )
    for i in range(3):  # extra keys so the listing spans pages with a small page size below
        client.put_object(Bucket=name, Key=f"llava/many/{i}.txt", Body=str(i).encode())
    return {"client": client, "name": name, "objects": objects, "endpoint": s3_endpoint}


def s3_source(bucket, **extra) -> dict:
    options = {"endpoint_url": bucket["endpoint"], "region": "us-east-1", "max_attempts": 3}
    options.update(extra.pop("options", {}))
    return {"kind": "s3", "location": f"s3://{bucket['name']}/llava", "options": options, **extra}


def test_s3_download_is_byte_identical_multipart_and_skipped_when_unchanged(tmp_path, bucket):
    head = bucket["client"].head_object(Bucket=bucket["name"], Key="llava/big.bin")
    assert head["ETag"].strip('"').endswith("-2")  # really a multipart object
    cfg = cfg_with(
        tmp_path,
        "remote",
        s3_source(bucket, options={"multipart_threshold": MIB, "multipart_chunksize": MIB}),
    )
    res = download(cfg, "remote")
    dest = cfg.raw_dir("remote")
    got = tree(dest)
    manifest = json.loads(got.pop(MANIFEST))
    expected = {k[len("llava/") :]: v for k, v in bucket["objects"].items() if k.startswith("llava/")}
    expected.update({f"many/{i}.txt": str(i).encode() for i in range(3)})
    assert got == expected
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {k: sha(v) for k, v in expected.items()}
    assert res.skipped is False and res.files == len(expected)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["remote"]  # no partial or work folder left
    mtimes = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    again = download(cfg, "remote")
    assert again.skipped is True
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == mtimes


def test_s3_patterns_filter_keys(tmp_path, bucket):
    cfg = cfg_with(tmp_path, "remote", s3_source(bucket, patterns=["images/*", "*.json"]))
    download(cfg, "remote")
    files = set(tree(cfg.raw_dir("remote"))) - {MANIFEST}
    assert files == {"data.json", "images/a.png", "images/sub/b.png"}


def test_s3_empty_prefix_is_an_error(tmp_path, bucket):
    cfg = cfg_with(tmp_path, "remote", {**s3_source(bucket), "location": f"s3://{bucket['name']}/nothing"})
    with pytest.raises(FileNotFoundError, match="no objects found"):
        download(cfg, "remote")
    assert not cfg.raw_dir("remote").exists()


def test_s3_listing_paginates(bucket):
    from llava_core.data.fetch import list_s3

    class SmallPages:  # the real client, with one key per page
        def __init__(self, client):
            self.client = client

        def get_paginator(self, name):
            real = self.client.get_paginator(name)

            class P:
                def paginate(self, **kw):
                    return real.paginate(**kw, PaginationConfig={"PageSize": 1})

            return P()

    keys = [o["key"] for o in list_s3(SmallPages(bucket["client"]), bucket["name"], "llava/")]
    assert len(keys) == 7 and "llava/big.bin" in keys


def test_etag_single_and_multipart(tmp_path):
    path = tmp_path / "f"
    data = b"x" * (5 * MIB + 10)
    path.write_bytes(data)
    assert etag_matches(path, hashlib.md5(data).hexdigest()) is True
    assert etag_matches(path, "0" * 32) is False
    parts = [hashlib.md5(data[: 5 * MIB]).digest(), hashlib.md5(data[5 * MIB :]).digest()]
    assert etag_matches(path, f'"{hashlib.md5(b"".join(parts)).hexdigest()}-2"') is True
    assert etag_matches(path, f"{'1' * 32}-2") is None  # cannot recompute: the size check decides


def test_s3_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"sources\.r: location 'bucket/x': an s3 source location must look like"):
        cfg_with(tmp_path, "r", {"kind": "s3", "location": "bucket/x"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['threads'\] for kind 's3'"):
        cfg_with(tmp_path, "r", {"kind": "s3", "location": "s3://b/x", "options": {"threads": 2}})


# --- HTTP ---------------------------------------------------------------------------------------------------
class Server:
    """A loopback HTTP server with Range support; `cut_first` serves only half of the bytes on the first GET,
    `fail_first` answers the first N GETs with 503 (a transient failure)."""

    def __init__(self, files: dict[str, bytes], cut_first: bool = False, fail_first: int = 0):
        self.files, self.cut_first, self.fail_first, self.requests = files, cut_first, fail_first, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                data = outer.files.get(self.path)
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                if len(outer.requests) <= outer.fail_first:
                    self.send_error(503)
                    return
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_first and len(outer.requests) == 1:
                    self.wfile.write(body[: len(body) // 2])  # the connection drops half way
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"


PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


def http_source(url: str, data: bytes, **extra) -> dict:
    return {"kind": "http", "location": url, "sha256": sha(data), "options": {"backoff_s": 0}, **extra}


def test_http_interrupted_download_resumes(tmp_path):
    with Server({"/d/data.bin": PAYLOAD}, cut_first=True) as srv:
        cfg = cfg_with(tmp_path, "web", http_source(srv.url("/d/data.bin"), PAYLOAD))
        res = download(cfg, "web")
    dest = cfg.raw_dir("web")
    assert (dest / "data.bin").read_bytes() == PAYLOAD
    assert res.files == 1 and res.skipped is False
    assert srv.requests[0] == ("/d/data.bin", None)
    assert srv.requests[1] == ("/d/data.bin", f"bytes={len(PAYLOAD) // 2}-")  # resumed, not restarted
    assert len(srv.requests) == 2
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["files"] == [{"path": "data.bin", "bytes": len(PAYLOAD), "sha256": sha(PAYLOAD)}]
    assert manifest["declaration"]["sha256"] == sha(PAYLOAD)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["web"]


def test_http_half_written_part_file_from_a_killed_run_is_resumed(tmp_path):
    with Server({"/data.bin": PAYLOAD}) as srv:
        cfg = cfg_with(tmp_path, "web", http_source(srv.url("/data.bin"), PAYLOAD))
        work = cfg.raw_dir("web").with_name(".web.work")
        work.mkdir(parents=True)
        (work / "data.bin.part").write_bytes(PAYLOAD[:300_000])
        download(cfg, "web")
        assert srv.requests == [("/data.bin", "bytes=300000-")]
        assert (cfg.raw_dir("web") / "data.bin").read_bytes() == PAYLOAD
        assert not work.exists()
        assert download(cfg, "web").skipped is True
        assert len(srv.requests) == 1  # a second run transfers nothing


def test_http_checksum_mismatch_is_refused(tmp_path):
    with Server({"/data.bin": PAYLOAD}) as srv:
        cfg = cfg_with(tmp_path, "web", {**http_source(srv.url("/data.bin"), PAYLOAD), "sha256": "a" * 64})
        with pytest.raises(ValueError, match="sha256 mismatch"):
            download(cfg, "web")
    assert not cfg.raw_dir("web").exists()
    assert not (cfg.raw_dir("web").with_name(".web.work") / "data.bin.part").exists()


def test_http_retries_give_a_clear_error(tmp_path):
    with Server({}) as srv:
        with pytest.raises(ConnectionError, match="HTTP 404"):
            http_download(srv.url("/missing.bin"), tmp_path / "m.part", retries=2, backoff_s=0)
    with pytest.raises(ConnectionError, match=r"download failed after 2 attempts.*rerun to resume"):
        http_download("http://127.0.0.1:9/x", tmp_path / "x.part", retries=1, backoff_s=0, timeout_s=2)


def test_http_config_needs_checksum(tmp_path):
    with pytest.raises(ConfigError, match=r"sources\.web: an http source needs 'sha256'"):
        cfg_with(tmp_path, "web", {"kind": "http", "location": "https://example.org/x.zip"})


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_http_zip_is_extracted(tmp_path):
    archive = zip_bytes({"images/a.png": png_bytes(), "data.json": b"[]"})
    with Server({"/pack.zip": archive}) as srv:
        cfg = cfg_with(tmp_path, "web", {**http_source(srv.url("/pack.zip"), archive), "extract": True})
        download(cfg, "web")
    assert set(tree(cfg.raw_dir("web"))) == {"images/a.png", "data.json", MANIFEST}


def test_http_zip_with_parent_entry_is_refused(tmp_path):
    archive = zip_bytes({"ok.txt": b"fine", "../evil.txt": b"escaped"})
    with Server({"/pack.zip": archive}) as srv:
        cfg = cfg_with(tmp_path, "web", {**http_source(srv.url("/pack.zip"), archive), "extract": True})
        with pytest.raises(UnsafeArchiveError, match=r"pack\.zip: refused, member '\.\./evil\.txt' would be written"):
            download(cfg, "web")
    raw = cfg.raw_dir("web").parent
    assert not cfg.raw_dir("web").exists()
    assert not list(tmp_path.rglob("evil.txt"))  # nothing outside the target (nor inside)
    assert not (raw / ".web.partial" / "ok.txt").exists()  # checked before anything is written


# --- archives -----------------------------------------------------------------------------------------------
def tar_with(path: Path, members: list[tarfile.TarInfo], data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            if m.isfile():
                m.size = len(data)
                tf.addfile(m, io.BytesIO(data))
            else:
                tf.addfile(m)
    return path


def member(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, link
    return m


@pytest.mark.parametrize(
    "bad, why",
    [
        (member("/etc/evil"), "would be written outside"),
        (member("a/../../evil"), "would be written outside"),
        (member("link", tarfile.SYMTYPE, "../../outside"), "is a link leaving the target folder"),
        (member("abs", tarfile.SYMTYPE, "/etc/passwd"), "is a link to the absolute path"),
        (member("hard", tarfile.LNKTYPE, "../outside"), "is a link leaving the target folder"),
        (member("dev", tarfile.CHRTYPE), "is a special file"),
    ],
)
def test_unsafe_tar_members_are_refused(tmp_path, bad, why):
    archive = tar_with(tmp_path / "a.tar.gz", [member("ok.txt"), bad])
    target = tmp_path / "target"
    with pytest.raises(UnsafeArchiveError, match=why):
        extract_archive(archive, target)
    assert list(target.iterdir()) == []
    assert {p.name for p in tmp_path.iterdir()} == {"a.tar.gz", "target"}


def test_safe_tar_with_internal_link_extracts(tmp_path):
    archive = tar_with(
        tmp_path / "a.tgz", [member("d/f.txt"), member("d/alias", tarfile.SYMTYPE, "f.txt")], data=b"content"
    )
    extract_archive(archive, tmp_path / "t")
    assert (tmp_path / "t" / "d" / "alias").read_bytes() == b"content"


def test_zip_symlink_leaving_folder_is_refused(tmp_path):
    path = tmp_path / "l.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("img.png")
        info.external_attr = (0o120777) << 16
        zf.writestr(info, "../../secret")
    with pytest.raises(UnsafeArchiveError, match="is a link leaving the target folder"):
        extract_archive(path, tmp_path / "t")
    assert not (tmp_path / "t" / "img.png").exists()


# --- Hugging Face Hub ---------------------------------------------------------------------------------------
SHA = "0123456789abcdef0123456789abcdef01234567"


def test_hf_snapshot_args(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    args = hf_snapshot_args("liuhaotian/LLaVA-Pretrain", SHA, ["*.json", "images.zip"], {}, tmp_path / "hf")
    assert args == {
        "repo_id": "liuhaotian/LLaVA-Pretrain",
        "repo_type": "dataset",
        "revision": SHA,
        "allow_patterns": ["*.json", "images.zip"],
        "token": "hf_secret",
        "local_dir": str(tmp_path / "hf"),
    }
    monkeypatch.delenv("HF_TOKEN")
    args = hf_snapshot_args("openai/clip", SHA, [], {"repo_type": "model"}, tmp_path)
    assert (args["token"], args["allow_patterns"], args["repo_type"]) == (None, None, "model")
    with pytest.raises(ValueError, match="repo_type 'git'"):
        hf_snapshot_args("x/y", SHA, [], {"repo_type": "git"}, tmp_path)


@pytest.mark.parametrize("revision", [None, "main", "v1.0", SHA[:7]])
def test_hf_unpinned_revision_is_rejected(tmp_path, revision):
    with pytest.raises(ValueError, match="revision must be pinned to a full commit sha"):
        hf_snapshot_args("x/y", revision, [], {}, tmp_path)
    source = {"kind": "hf", "location": "liuhaotian/LLaVA-Pretrain"}
    if revision:
        source["revision"] = revision
    with pytest.raises(ConfigError, match=r"sources\.pt: hf source 'liuhaotian/LLaVA-Pretrain': revision must be"):
        cfg_with(tmp_path, "pt", source)


def test_hf_declaration_in_manifest_is_pinned(tmp_path):
    cfg = cfg_with(tmp_path, "pt", {"kind": "hf", "location": "a/b", "revision": SHA, "patterns": ["*.json"]})
    from llava_core.data.sources import declaration_of

    assert declaration_of(cfg.sources["pt"]) == {
        "kind": "hf",
        "generator": None,
        "location": "a/b",
        "options": {},
        "revision": SHA,
        "patterns": ["*.json"],
    }


def test_fields_for_other_kinds_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="'revision' applies to hf sources only"):
        cfg_with(tmp_path, "x", {"kind": "local", "location": "/tmp", "revision": SHA})
