"""Stage 2, conversion: a downloaded source file -> LLaVA jsonl (REFERENCE.md section 3), with a report.

Converters are chosen by name from `CONVERTERS`. Each yields candidate records; one validation pass keeps a
record or drops it with a counted reason, so nothing disappears silently. Output and report are written
through temporary names and renamed into place.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llava_core.config import PipelineConfig, write_json_atomic
from llava_core.images import ImageRejected, check_image, resolve_image
from llava_core.prompts import IMAGE_PLACEHOLDER


class Drop(Exception):
    """Raised by a converter for one input item; `reason` is counted in the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ConvertResult:
    dataset: str
    path: Path
    report_path: Path
    read: int
    written: int
    dropped: dict[str, int] = field(default_factory=dict)


def _llava_json(path: Path) -> Iterator[dict | Drop]:
    """A JSON array of LLaVA records (LLaVA-Pretrain, LLaVA-Instruct/mix665k, ShareGPT4V): json -> jsonl."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for item in data:
        yield item if isinstance(item, dict) else Drop("not_an_object")


CONVERTERS: dict[str, Callable[[Path], Iterator[dict | Drop]]] = {
    "llava_json": _llava_json,
}


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
    n_placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv)
    out: dict = {"id": str(rec["id"])}
    image = rec.get("image")
    if image is not None:
        if n_placeholders != 1 or IMAGE_PLACEHOLDER not in conv[0]["value"]:
            raise Drop("image_placeholder_count")
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
    elif n_placeholders:
        raise Drop("image_placeholder_without_image")
    out["conversations"] = [{"from": t["from"], "value": t["value"]} for t in conv]
    return out


def convert(cfg: PipelineConfig, dataset: str, check_images: bool = True) -> ConvertResult:
    """Convert one configured dataset to `data/jsonl/<dataset>.jsonl` and its `.report.json`."""
    if dataset not in cfg.datasets:
        raise KeyError(f"unknown dataset {dataset!r}; valid: {sorted(cfg.datasets)}")
    ds = cfg.datasets[dataset]
    src_file = cfg.raw_dir(ds.source) / ds.file
    if not src_file.is_file():
        raise FileNotFoundError(f"{src_file} not found: download source {ds.source!r} first")
    prefix = ds.image_prefix if ds.image_prefix is not None else f"{ds.source}/"
    out_path = cfg.jsonl_path(dataset)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    read = written = 0
    dropped: Counter[str] = Counter()
    seen_ids: set[str] = set()
    with open(tmp, "w", encoding="utf-8") as f:
        for item in CONVERTERS[ds.converter](src_file):
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
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            written += 1
    tmp.replace(out_path)
    report_path = out_path.with_suffix(".report.json")
    report = {
        "dataset": dataset,
        "source_file": str(src_file),
        "converter": ds.converter,
        "read": read,
        "written": written,
        "dropped": dict(sorted(dropped.items())),
        "dropped_total": sum(dropped.values()),
    }
    write_json_atomic(report_path, report)
    return ConvertResult(dataset, out_path, report_path, read, written, dict(dropped))
