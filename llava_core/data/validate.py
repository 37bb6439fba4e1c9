"""The data gate before training: Great Expectations suites over a phase's jsonl records and its HDF5 examples.

Each suite runs on a pandas frame with one row per record (jsonl) or per example (HDF5), in an ephemeral
Great Expectations context (nothing is written to a `great_expectations/` folder). The results, without
timestamps or random ids (the same data gives the same file), go to `data/hdf5/<phase>.validation.json`,
beside the phase's HDF5 folder. Dagster runs `validate_phase` as blocking asset checks of `hdf5_<phase>`,
DVC as the `validate_<phase>` stage that the training stage depends on; either way a failure stops training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from llava_core.artifacts import DATA_PARAMS
from llava_core.atomic import write_json_atomic
from llava_core.config import PipelineConfig
from llava_core.data.hdf5_format import Hdf5Folder
from llava_core.data.images import ImageChecker, ImageRejected
from llava_core.data.prompts import PromptError, conversation_segments, placeholder_problem
from llava_core.phases import get_phase

EXAMPLES_SHOWN = 5  # failing rows named per expectation in the summary


@dataclass
class SuiteResult:
    name: str
    success: bool
    evaluated: int
    failed: int
    rows: int
    expectations: list[dict] = field(default_factory=list)


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


def jsonl_frame(cfg: PipelineConfig, phase: str) -> pd.DataFrame:
    """One row per jsonl record of the phase: parse, structure, placeholder and image-path facts."""
    style = cfg.hdf5[phase].prompt_style
    images = ImageChecker(cfg.image_root)
    rows = []
    for dataset in cfg.datasets_for(phase):
        path = cfg.jsonl_path(dataset)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the conversion stage first")
        with open(path, "rb") as f:  # a line that is not UTF-8 is a row that does not parse, not a crash
            for n, line in enumerate(f, start=1):
                if line.strip():
                    rows.append(_jsonl_row(f"{path.name}:{n}", dataset, line, style, images))
    return pd.DataFrame(rows, columns=JSONL_COLUMNS)


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
        return os.path.isfile(images.resolve(rel))
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


def hdf5_frame(folder: Path, image_root: Path) -> tuple[pd.DataFrame, dict]:
    """One row per written example, computed from the files block by block (and `data_params.json`)."""
    data = Hdf5Folder(folder)
    params = data.params
    s, e = data.image_start, data.image_start + data.num_patches
    pad, bos, eos = params["pad_id"], params["bos_id"], params["eos_id"]
    images = ImageChecker(image_root)
    parts = []
    for block in data.blocks():
        ids, loss, labels, kpm = (block.data[:, r] for r in range(4))  # each (b, MSL)
        n, msl = ids.shape
        has_image = np.array([p is not None for p in block.paths])
        attended = kpm == 0
        seq_len = np.where(attended.any(1), msl - attended[:, ::-1].argmax(1), 0)
        pos = np.arange(msl)[None, :]
        # targets that are image slots or lie past the sequence are never supervised
        outside = (pos >= seq_len[:, None] - 1) | ((pos >= s - 1) & (pos < e - 1))
        slots_kpm = kpm[:, s:e]
        resolvable = [(p is None) or _resolvable(images, p) for p in block.paths]
        parts.append(
            pd.DataFrame(
                {
                    "where": [f"{block.file}[{block.start + i}]" for i in range(n)],
                    "has_image": has_image,
                    "seq_len": seq_len,
                    "min_token_id": ids.min(1),
                    "max_token_id": np.maximum(ids.max(1), labels.max(1)),
                    "loss_tokens": loss.sum(1),
                    "loss_outside_answers": (loss * outside).sum(1),
                    "labels_are_shifted_inputs": (labels[:, :-1] == ids[:, 1:]).all(1) & (labels[:, -1] == pad),
                    "first_is_bos": ids[:, 0] == bos,
                    "ends_with_eos": ids[np.arange(n), np.maximum(seq_len - 1, 0)] == eos,
                    "image_slots_are_pad": (ids[:, s:e] == pad).all(1),
                    "slot_padding_mask_ok": np.where(has_image, (slots_kpm == 0).all(1), (slots_kpm == 1).all(1)),
                    "image_path_resolvable": resolvable,
                },
                columns=HDF5_COLUMNS,
            )
        )
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=HDF5_COLUMNS)
    return frame, params


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


def run_suite(name: str, frame: pd.DataFrame, expectations: list) -> SuiteResult:
    """Validate `frame` against `expectations` in an ephemeral context; failing rows named by `where`."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    batch_def = (
        context.data_sources.add_pandas(name)
        .add_dataframe_asset(f"{name}_rows")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=f"{name}_suite"))
    for exp in expectations:
        suite.add_expectation(exp)
    frame = frame.reset_index(drop=True)
    result = batch_def.get_batch(batch_parameters={"dataframe": frame}).validate(
        suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES_SHOWN}
    )
    out = [_expectation_record(r, frame) for r in result.results]
    failed = sum(not e["success"] for e in out)
    return SuiteResult(name, bool(result.success), len(out), failed, len(frame), out)


def _expectation_record(r, frame: pd.DataFrame) -> dict:
    cfg = r.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    rec = {"expectation": cfg.type, "kwargs": kwargs, "success": bool(r.success)}
    res = r.result or {}
    if "unexpected_count" in res:
        rec["unexpected_count"] = int(res["unexpected_count"])
        rec["element_count"] = int(res.get("element_count", len(frame)))
        index = res.get("partial_unexpected_index_list") or []
        rec["examples"] = [str(frame.at[i, "where"]) for i in index[:EXAMPLES_SHOWN] if isinstance(i, int)]
        if not rec["examples"] and not r.success:  # some versions give no indices: find the rows again
            rec["examples"] = _failing_rows(frame, kwargs)
    if "observed_value" in res:
        rec["observed_value"] = res["observed_value"]
    if r.exception_info and r.exception_info.get("raised_exception"):
        rec["error"] = str(r.exception_info.get("exception_message"))
    return rec


def _failing_rows(frame: pd.DataFrame, kwargs: dict) -> list[str]:
    col = kwargs.get("column")
    if col not in frame:
        return []
    values = frame[col]
    bad = pd.Series(False, index=frame.index)
    if "value_set" in kwargs:
        bad |= ~values.isin(kwargs["value_set"])
    if kwargs.get("min_value") is not None:
        bad |= values < kwargs["min_value"]
    if kwargs.get("max_value") is not None:
        bad |= values > kwargs["max_value"]
    return [str(w) for w in frame.loc[bad, "where"].head(EXAMPLES_SHOWN)]


class ValidationFailed(RuntimeError):
    """A phase's data failed its suites; the message is the readable summary."""


def validate_phase(cfg: PipelineConfig, phase: str) -> ValidationResult:
    """Run both suites on a built phase and write `data/hdf5/<phase>.validation.json`."""
    folder = cfg.hdf5_dir(get_phase(phase).name)
    params_file = folder / DATA_PARAMS
    if not params_file.is_file():
        raise FileNotFoundError(f"{params_file} not found: run `llava-pipeline hdf5 {phase}` first")
    hdf5_rows, params = hdf5_frame(folder, cfg.image_root)
    suites = {
        "jsonl": run_suite(f"jsonl_{phase}", jsonl_frame(cfg, phase), jsonl_expectations(phase)),
        "hdf5": run_suite(
            f"hdf5_{phase}", hdf5_rows, hdf5_expectations(params, cfg.hdf5[phase].max_discarded_fraction)
        ),
    }
    success = all(s.success for s in suites.values())
    path = cfg.validation_path(phase)
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
