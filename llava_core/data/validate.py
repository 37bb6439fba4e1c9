"""The data gate before training: Great Expectations suites over a phase's jsonl records and its HDF5 examples.

Each suite sees pandas frames with one row per record (jsonl) or per example (HDF5), at most `CHUNK_ROWS` rows
at a time (`ChunkedSuite`: the same expectations and the same results as on one frame of every row, in memory
bounded by the chunk, not the data), in an ephemeral Great Expectations context (nothing is written to a
`great_expectations/` folder). The results, without timestamps or random ids (the same data gives the same
file), go to `data/hdf5/<phase>.validation.json`, beside the phase's HDF5 folder. Dagster runs `validate_phase`
as blocking asset checks of `hdf5_<phase>`, DVC as the `validate_<phase>` stage that the training stage depends
on; either way a failure stops training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from llava_core.artifacts import DATA_PARAMS
from llava_core.atomic import partial_dir, write_json_atomic
from llava_core.config import PipelineConfig
from llava_core.data.chunked_suite import CHUNK_ROWS, ChunkedSuite, SuiteResult, chunks, partitioned
from llava_core.data.hdf5_format import Hdf5Folder, read_data_params
from llava_core.data.hdf5_writer import count_records
from llava_core.data.images import ImageChecker, ImageRejected
from llava_core.data.prompts import PromptError, conversation_segments, placeholder_problem
from llava_core.phases import get_phase


@dataclass
class ValidationResult:
    phase: str
    path: Path
    success: bool
    suites: dict[str, SuiteResult]

    def summary(self) -> str:
        """A few readable lines: the verdict, then each failed expectation with example rows."""
        failed = sum(s.failed for s in self.suites.values())
        total = sum(s.evaluated for s in self.suites.values())
        verdict = "passed" if self.success else f"FAILED ({failed} of {total} expectations)"
        lines = [f"validation of {self.phase} {verdict}: {self.path}"]
        for suite in self.suites.values():
            lines.append(
                f"  {suite.name}: {suite.evaluated - suite.failed}/{suite.evaluated} passed on {suite.rows} rows"
            )
            for e in suite.expectations:
                if not e["success"]:
                    lines.append(f"    x {describe(e)}")
        return "\n".join(lines)


def describe(e: dict) -> str:
    """One failed expectation in words, e.g. `max_token_id between None and 773: 3 of 40 rows fail (...)`."""
    kw = e["kwargs"]
    what = e["expectation"].removeprefix("expect_")
    target = kw.get("column", "table")
    bounds = ", ".join(f"{k}={kw[k]}" for k in ("min_value", "max_value", "value", "value_set") if k in kw)
    text = f"{target}: {what}({bounds})"
    if "unexpected_count" in e:
        text += f": {e['unexpected_count']} of {e['element_count']} rows fail"
        if e.get("examples"):
            text += f", e.g. {'; '.join(e['examples'])}"
    elif "observed_value" in e:
        text += f": observed {e['observed_value']}"
    return text


# --- frames -------------------------------------------------------------------------------------------------


def jsonl_rows(cfg: PipelineConfig, phase: str) -> Iterator[dict]:
    """One row per jsonl record of the phase: parse, structure, placeholder and image-path facts."""
    style = cfg.hdf5[phase].prompt_style
    images = ImageChecker(cfg.image_root)
    for dataset, path in zip(cfg.datasets_for(phase), _jsonl_paths(cfg, phase), strict=True):
        with open(path, "rb") as f:  # a line that is not UTF-8 is a row that does not parse, not a crash
            for n, line in enumerate(f, start=1):
                if line.strip():
                    yield _jsonl_row(f"{path.name}:{n}", dataset, line, style, images)


def _jsonl_paths(cfg: PipelineConfig, phase: str) -> list[Path]:
    """The phase's jsonl files, which must exist."""
    paths = [cfg.jsonl_path(d) for d in cfg.datasets_for(phase)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the conversion stage first")
    return paths


JSONL_COLUMNS = [
    "where",
    "key",
    "parsed",
    "turns",
    "conversation_ok",
    "placeholders_match_image",
    "has_image",
    "image_path_resolvable",
]


def _jsonl_row(where: str, dataset: str, line: bytes, style: str, images: ImageChecker) -> dict:
    row = dict.fromkeys(JSONL_COLUMNS, False)
    row.update(where=where, key=None, turns=0)
    try:
        rec = json.loads(line)
        conv = rec["conversations"]
        if not isinstance(conv, list):
            raise TypeError
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return row
    row["parsed"] = True
    row["key"] = f"{dataset}/{rec['id']}" if rec.get("id") is not None else None
    row["turns"] = len(conv)
    try:
        conversation_segments(conv, style)
        row["conversation_ok"] = True
    except PromptError:
        pass
    image = rec.get("image")
    row["has_image"] = image is not None
    row["placeholders_match_image"] = placeholder_problem(conv, image is not None) is None
    row["image_path_resolvable"] = image is None or _resolvable(images, image)
    return row


def _resolvable(images: ImageChecker, rel) -> bool:
    try:
        return os.path.isfile(images.resolve(rel, as_path=False))
    except ImageRejected:
        return False


HDF5_COLUMNS = [
    "where",
    "has_image",
    "seq_len",
    "min_token_id",
    "max_token_id",
    "loss_tokens",
    "loss_outside_answers",
    "labels_are_shifted_inputs",
    "first_is_bos",
    "ends_with_eos",
    "image_slots_are_pad",
    "slot_padding_mask_ok",
    "image_path_resolvable",
]


def hdf5_frames(folder: Path, image_root: Path) -> Iterator[pd.DataFrame]:
    """One row per written example, a frame per block of rows read (index: the example's number)."""
    data = Hdf5Folder(folder)
    params = data.params
    s, e = data.image_start, data.image_start + data.num_patches
    pad, bos, eos = params["pad_id"], params["bos_id"], params["eos_id"]
    images = ImageChecker(image_root)
    for block in data.blocks():
        ids, loss, labels, kpm = (block.data[:, r] for r in range(4))  # each (b, MSL)
        n, msl = ids.shape
        has_image = np.array([p is not None for p in block.paths])
        attended = kpm == 0
        seq_len = np.where(attended.any(1), msl - attended[:, ::-1].argmax(1), 0)  # the inputs: tokens[:-1]
        pos = np.arange(msl)[None, :]
        inside = pos < seq_len[:, None]
        last = np.maximum(seq_len - 1, 0)
        # targets that are image slots or lie past the inputs are never supervised
        outside = ~inside | ((pos >= s - 1) & (pos < e - 1))
        # labels = tokens[1:]: each label is the next input, but the last (the final `</s>`); pad past the inputs
        next_input = np.concatenate([ids[:, 1:], np.full((n, 1), pad)], axis=1)
        shifted = np.where(inside & (pos != last[:, None]), labels == next_input, True)
        padded = np.where(inside, True, (labels == pad) & (ids == pad))
        slots_kpm = kpm[:, s:e]
        resolvable = [(p is None) or _resolvable(images, p) for p in block.paths]
        yield pd.DataFrame(
            {
                "where": [f"{block.file}[{block.start + i}]" for i in range(n)],
                "has_image": has_image,
                "seq_len": seq_len,
                "min_token_id": ids.min(1),
                "max_token_id": np.maximum(ids.max(1), labels.max(1)),
                "loss_tokens": loss.sum(1),
                "loss_outside_answers": (loss * outside).sum(1),
                "labels_are_shifted_inputs": shifted.all(1) & padded.all(1),
                "first_is_bos": ids[:, 0] == bos,
                "ends_with_eos": labels[np.arange(n), last] == eos,
                "image_slots_are_pad": (ids[:, s:e] == pad).all(1),
                "slot_padding_mask_ok": np.where(has_image, (slots_kpm == 0).all(1), (slots_kpm == 1).all(1)),
                "image_path_resolvable": resolvable,
            },
            columns=HDF5_COLUMNS,
            index=pd.RangeIndex(block.index, block.index + n),
        )


def hdf5_frame(folder: Path, image_root: Path) -> tuple[pd.DataFrame, dict]:
    """Every example's row in one frame (small folders, tests), and `data_params.json`."""
    parts = list(hdf5_frames(folder, image_root))
    frame = pd.concat(parts) if parts else pd.DataFrame(columns=HDF5_COLUMNS)
    return frame, read_data_params(folder)


# --- suites -------------------------------------------------------------------------------------------------


def jsonl_expectations(phase: str) -> list:
    import great_expectations.expectations as gxe

    out = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeInSet(column="parsed", value_set=[True]),
        gxe.ExpectColumnValuesToNotBeNull(column="key"),
        gxe.ExpectColumnValuesToBeUnique(column="key"),
        gxe.ExpectColumnValuesToBeBetween(column="turns", min_value=2),
        gxe.ExpectColumnValuesToBeInSet(column="conversation_ok", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="placeholders_match_image", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="image_path_resolvable", value_set=[True]),
    ]
    if phase == "phase1":  # feature alignment trains on images only
        out.append(gxe.ExpectColumnValuesToBeInSet(column="has_image", value_set=[True]))
    return out


def hdf5_expectations(params: dict, max_discarded_fraction: float) -> list:
    import great_expectations.expectations as gxe

    info = params["image_patch_info"]
    msl = params["settings"]["max_sequence_length"]
    min_kept = math.ceil((1.0 - max_discarded_fraction) * params["processed"] - 1e-9)
    return [
        gxe.ExpectTableRowCountToEqual(value=params["examples"]),
        # the discard gate: at most max_discarded_fraction of the records may have been rejected
        gxe.ExpectTableRowCountToBeBetween(min_value=max(1, min_kept)),
        gxe.ExpectColumnValuesToBeBetween(column="seq_len", min_value=info["num_patches"] + 2, max_value=msl),
        gxe.ExpectColumnValuesToBeBetween(column="min_token_id", min_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="max_token_id", max_value=params["vocab_size"] - 1),
        gxe.ExpectColumnValuesToBeBetween(column="loss_tokens", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="loss_outside_answers", min_value=0, max_value=0),
        gxe.ExpectColumnValuesToBeInSet(column="labels_are_shifted_inputs", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="first_is_bos", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="ends_with_eos", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="image_slots_are_pad", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="slot_padding_mask_ok", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="image_path_resolvable", value_set=[True]),
    ]


def run_suite(name: str, frames: Iterable[pd.DataFrame], expectations: list, columns: list[str]) -> SuiteResult:
    """Validate the rows of `frames` (chunks of one table, index: the row numbers) against `expectations` in an
    ephemeral context; failing rows named by `where`."""
    suite = ChunkedSuite(name, expectations, columns)
    for frame in frames:
        suite.add(frame)
    return suite.result()


class ValidationFailed(RuntimeError):
    """A phase's data failed its suites; the message is the readable summary."""


def validate_phase(cfg: PipelineConfig, phase: str, chunk_rows: int = CHUNK_ROWS) -> ValidationResult:
    """Run both suites on a built phase, `chunk_rows` rows at a time, and write `data/hdf5/<phase>.validation.json`."""
    folder = cfg.hdf5_dir(get_phase(phase).name)
    params_file = folder / DATA_PARAMS
    if not params_file.is_file():
        raise FileNotFoundError(f"{params_file} not found: run `llava-pipeline hdf5 {phase}` first")
    params = read_data_params(folder)
    path = cfg.validation_path(phase)
    spill = partial_dir(path)  # the jsonl rows' partitions wait here (a killed run's: removed by the next)
    try:
        records = sum(count_records(p) for p in _jsonl_paths(cfg, phase))
        jsonl = partitioned(jsonl_rows(cfg, phase), records, "key", JSONL_COLUMNS, spill, chunk_rows)
        hdf5 = chunks(hdf5_frames(folder, cfg.image_root), chunk_rows)
        suites = {
            "jsonl": run_suite(f"jsonl_{phase}", jsonl, jsonl_expectations(phase), JSONL_COLUMNS),
            "hdf5": run_suite(
                f"hdf5_{phase}",
                hdf5,
                hdf5_expectations(params, cfg.hdf5[phase].max_discarded_fraction),
                HDF5_COLUMNS,
            ),
        }
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    success = all(s.success for s in suites.values())
    write_json_atomic(
        path,
        {
            "phase": phase,
            "success": success,
            "hdf5": cfg.rel(folder),
            "data_params_sha256": hashlib.sha256(params_file.read_bytes()).hexdigest(),
            "suites": {k: s.__dict__ for k, s in suites.items()},
        },
    )
    return ValidationResult(phase, path, success, suites)
