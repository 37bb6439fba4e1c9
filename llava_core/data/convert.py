"""Stage 2, conversion: a downloaded source file -> LLaVA jsonl (docs/formats.md), with a report.

Converters are chosen by name from `CONVERTERS` (llava_core/data/converters.py). Each yields candidate records; one validation pass keeps a
record or drops it with a counted reason, so nothing disappears silently. Output and report are written
through temporary names and renamed into place.
"""

from __future__ import annotations

import glob
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llava_core.atomic import json_text, staged
from llava_core.config import PipelineConfig
from llava_core.data.converters import CONVERTERS, ConvertInput, Drop  # noqa: F401  (Drop re-exported)
from llava_core.data.images import ImageRejected, check_image, resolve_image
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


def validate_record(rec: dict, image_root: Path, image_prefix: str, check_images: bool = True) -> dict:
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
            resolve_image(image_root / image_prefix if image_prefix else image_root, image)
            resolve_image(image_root, rel)
            if check_images:
                check_image(image_root, rel)
        except ImageRejected as e:
            raise Drop(e.reason) from None
        out["image"] = rel
    out["conversations"] = [{"from": t["from"], "value": t["value"]} for t in conv]
    return out


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
    seen_ids: set[str] = set()
    with staged(out_path, tmp, image_tmp), open(tmp, "w", encoding="utf-8") as f:
        for item in conv.fn(inp):
            read += 1
            try:
                if isinstance(item, Drop):
                    raise item
                rec = validate_record(item, cfg.image_root, prefix, check_images)
                if rec["id"] in seen_ids:
                    raise Drop("duplicate_id")
                seen_ids.add(rec["id"])
            except Drop as d:
                dropped[d.reason] += 1
                continue
            if conv.writes_images and rec.get("image", "").startswith(tmp_prefix):
                rec["image"] = final_prefix + rec["image"][len(tmp_prefix) :]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            written += 1
        if not read:
            raise ValueError(f"{', '.join(str(p) for p in files)}: no records found; nothing was converted")
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
