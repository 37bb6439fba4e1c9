"""Stage 2, conversion: a downloaded source file -> LLaVA jsonl (docs/formats.md), with a report.

Converters are chosen by name from `CONVERTERS` (llava_core/data/converters.py). Each yields candidate records; one validation pass keeps a
record or drops it with a counted reason, so nothing disappears silently. Output and report are written
through temporary names and renamed into place.
"""

from __future__ import annotations

import glob
import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llava_core.atomic import json_text, staged
from llava_core.config import PipelineConfig
from llava_core.data.converters import CONVERTERS, ConvertInput, Drop, add_suffix  # noqa: F401  (Drop re-exported)
from llava_core.data.image_cache import ImageCheckCache, cache_folder
from llava_core.data.images import ImageChecker, ImageRejected
from llava_core.data.prompts import placeholder_problem, text_is_valid_unicode
from llava_core.phases import choose

EXTRACTED = "extracted"  # images written by converters: data/raw/<source>/extracted/<dataset>/


@dataclass
class ConvertResult:
    dataset: str
    path: Path
    report_path: Path
    read: int
    written: int
    dropped: dict[str, int] = field(default_factory=dict)


class RecordImages:
    """The image checks of one conversion: paths inside the source's folder and the image root, and the decode
    (through the image checks' cache when one is given). Folders are resolved once, not per record."""

    def __init__(self, image_root: Path, image_prefix: str, cache: ImageCheckCache | None = None) -> None:
        self.root = ImageChecker(image_root, cache=cache)
        self.source = ImageChecker(image_root / image_prefix if image_prefix else image_root)


def validate_record(
    rec: dict, image_root: Path, image_prefix: str, check_images: bool = True, images: RecordImages | None = None
) -> dict:
    """Normalise one candidate record to the section-3 shape or raise Drop with the reason."""
    conv = rec.get("conversations")
    if "id" not in rec or not isinstance(conv, list) or not conv:
        raise Drop("missing_fields")
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise Drop("malformed_turn")
        if turn["from"] != ("human" if k % 2 == 0 else "gpt"):
            raise Drop("turns_not_alternating")
    if len(conv) % 2:
        raise Drop("odd_number_of_turns")
    if not text_is_valid_unicode(rec):  # a lone surrogate (`\\ud800`): cannot be written as UTF-8
        raise Drop("invalid_unicode")
    out: dict = {"id": str(rec["id"])}
    image = rec.get("image")
    problem = placeholder_problem(conv, image is not None)
    if problem is not None:
        raise Drop(problem)
    if image is not None:
        if not isinstance(image, str) or not image:
            raise Drop("missing_fields")
        rel = image_prefix + image
        try:
            # the path must stay inside its own source's folder (no absolute paths, no `..` escapes),
            # and the prefixed path inside the image root
            images = images or RecordImages(image_root, image_prefix)
            images.source.resolve(image, as_path=False)
            if check_images:
                images.root.check(rel)
            else:
                images.root.resolve(rel, as_path=False)
        except ImageRejected as e:
            raise Drop(e.reason) from None
        out["image"] = rel
    out["conversations"] = [{"from": t["from"], "value": t["value"]} for t in conv]
    return out


class SeenIds:
    """The record ids met so far, as 128-bit digests (16 bytes an id, against about 90 for a set of strings), in
    256 buckets by the digest's first byte, each a sorted array: what a conversion holds grows by little with the
    records, and merging new digests into a bucket never copies more than that bucket. Two different ids share a
    digest with a chance of about 1e-27 at a million records."""

    BUCKETS = 256

    def __init__(self, merge_every: int = 64) -> None:
        self.high = [np.empty(0, dtype=np.uint64) for _ in range(self.BUCKETS)]  # each sorted by (high, low)
        self.low = [np.empty(0, dtype=np.uint64) for _ in range(self.BUCKETS)]
        self.recent: list[set[bytes]] = [set() for _ in range(self.BUCKETS)]
        self.merge_every = merge_every

    def __len__(self) -> int:
        return sum(len(h) + len(r) for h, r in zip(self.high, self.recent, strict=True))

    def add(self, record_id: str) -> bool:
        """Remember `record_id`; False when it was met before."""
        d = hashlib.blake2b(record_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        b = d[0]
        if d in self.recent[b]:
            return False
        high, low = int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")
        highs = self.high[b]
        i = int(np.searchsorted(highs, np.uint64(high)))
        while i < len(highs) and int(highs[i]) == high:
            if int(self.low[b][i]) == low:
                return False
            i += 1
        self.recent[b].add(d)
        if len(self.recent[b]) >= self.merge_every:
            self._merge(b)
        return True

    def _merge(self, b: int) -> None:
        new = np.frombuffer(b"".join(self.recent[b]), dtype="<u8").reshape(-1, 2)
        high, low = np.concatenate([self.high[b], new[:, 0]]), np.concatenate([self.low[b], new[:, 1]])
        order = np.lexsort((low, high))
        self.high[b], self.low[b], self.recent[b] = high[order], low[order], set()


def dataset_files(root: Path, file: str, folder_glob: str) -> list[Path]:
    """The files a dataset's `file` names: a file, a folder (its `folder_glob` matches), or a glob; sorted."""
    target = root / file
    if target.is_file():
        files = [target]
    elif target.is_dir():
        files = sorted(p for p in target.glob(folder_glob) if p.is_file())
    else:
        pattern = f"{glob.escape(str(root))}/{file}"
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    base = root.resolve()
    for p in files:
        if base not in p.resolve().parents:
            raise ValueError(f"{p}: dataset file is outside the source folder {root}")
    return files


def _source_files(cfg: PipelineConfig, dataset: str) -> list[Path]:
    """The dataset's files in its source folder: present, and none of them empty."""
    ds = cfg.datasets[choose("dataset", dataset, cfg.datasets)]
    root = cfg.raw_dir(ds.source)
    files = dataset_files(root, ds.file, CONVERTERS[ds.converter].folder_glob) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{root / ds.file} not found (or matches no file): download source {ds.source!r} first")
    empty = [str(p) for p in files if p.stat().st_size == 0]
    if empty:
        raise ValueError(f"{', '.join(empty)}: empty file (0 bytes); nothing was converted")
    return files


def convert(cfg: PipelineConfig, dataset: str, check_images: bool = True) -> ConvertResult:
    """Convert one configured dataset to `data/jsonl/<dataset>.jsonl` and its `.report.json`.

    Converters that carry image bytes write them to `data/raw/<source>/extracted/<dataset>/`, first under a
    temporary name that is renamed into place together with the jsonl.
    """
    files = _source_files(cfg, dataset)
    ds = cfg.datasets[dataset]
    conv = CONVERTERS[ds.converter]
    root = cfg.raw_dir(ds.source)
    options = {**conv.options, **ds.options}
    if "seed" in options and options["seed"] is None:
        options["seed"] = cfg.seed
    prefix = ds.image_prefix if ds.image_prefix is not None else f"{ds.source}/"
    image_final = root / EXTRACTED / dataset
    image_tmp = root / EXTRACTED / f".{dataset}.partial"
    inp = ConvertInput(root=root, files=files, options=options)
    if conv.writes_images:
        if image_tmp.exists():
            shutil.rmtree(image_tmp)
        image_tmp.mkdir(parents=True)
        inp.image_dir, inp.image_rel = image_tmp, image_tmp.relative_to(root).as_posix()
    tmp_prefix, final_prefix = f"{prefix}{inp.image_rel}/", f"{prefix}{EXTRACTED}/{dataset}/"

    out_path = cfg.jsonl_path(dataset)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    read = written = 0
    dropped: Counter[str] = Counter()
    seen_ids = SeenIds()
    image_root = cfg.image_root
    cache = ImageCheckCache(cache_folder(image_root)) if check_images else None
    images = RecordImages(image_root, prefix, cache)
    with staged(out_path, tmp, image_tmp), open(tmp, "w", encoding="utf-8") as f:
        for item in conv.fn(inp):
            read += 1
            try:
                if isinstance(item, Drop):
                    raise item
                rec = validate_record(item, image_root, prefix, check_images, images)
                if not seen_ids.add(rec["id"]):
                    raise Drop("duplicate_id")
                rec["conversations"] = add_suffix(rec["conversations"], options.get("suffix", "none"))
            except Drop as d:
                dropped[d.reason] += 1
                continue
            if conv.writes_images and rec.get("image", "").startswith(tmp_prefix):
                rec["image"] = final_prefix + rec["image"][len(tmp_prefix) :]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            written += 1
        if not read:
            raise ValueError(f"{', '.join(str(p) for p in files)}: no records found; nothing was converted")
    if cache is not None:
        cache.close()
    report_path = cfg.convert_report(dataset)
    report = {
        "dataset": dataset,
        "source_file": cfg.rel(root / ds.file),  # relative to the workspace root: portable
        "files": [p.relative_to(root).as_posix() for p in files],
        "converter": ds.converter,
        "options": options,
        "read": read,
        "written": written,
        "dropped": dict(sorted(dropped.items())),
        "dropped_total": sum(dropped.values()),
    }
    if conv.writes_images:
        report["images_written_to"] = cfg.rel(image_final)
    report_tmp = report_path.with_name(f".{report_path.name}.tmp")
    with staged(report_path, report_tmp, tmp, image_tmp):  # every output is complete before any is renamed
        report_tmp.write_text(json_text(report))
    if conv.writes_images:
        if image_final.exists():
            shutil.rmtree(image_final)
        image_tmp.rename(image_final)
    tmp.replace(out_path)
    report_tmp.replace(report_path)
    return ConvertResult(dataset, out_path, report_path, read, written, dict(dropped))
