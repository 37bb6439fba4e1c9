"""A Great Expectations suite run over a table in bounded chunks, with the results of one run over the whole table.

The gate's tables have a row per record or per example: a million rows and more at LLaVA's sizes. `ChunkedSuite`
validates each chunk (a pandas frame whose index is the rows' numbers in the whole table) as one GX batch and
folds the results: a column expectation's counts are summed, its success is every chunk's, and its example rows
are the first failing rows of the whole table (each chunk names its first ones, in row order). The table's
row-count expectations run once, on a frame with the total number of rows and no columns (a RangeIndex: no
memory). `partitioned` deals rows into chunks by a key column, so that equal keys meet in one chunk: a
uniqueness expectation then finds every duplicate, as it would on the whole table.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

EXAMPLES_SHOWN = 5  # failing rows named per expectation in the summary
CHUNK_ROWS = 65536  # rows per GX batch: what the gate holds at a time (about 30 MB of frame)
SPILL_ROWS = 4096  # rows a partition buffers before they are appended to its file


@dataclass
class SuiteResult:
    name: str
    success: bool
    evaluated: int
    failed: int
    rows: int
    expectations: list[dict] = field(default_factory=list)


def _context(name: str):
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
    return gx, context, batch_def


class ChunkedSuite:
    """`expectations` validated on the chunks given to `add`, then `result()` (see the module's docstring)."""

    def __init__(self, name: str, expectations: list, columns: list[str]) -> None:
        gx, self.context, self.batch_def = _context(name)
        self.name, self.columns = name, columns
        self.suites = {}
        for kind in ("column", "table"):
            chosen = [e for e in expectations if (getattr(e, "column", None) is not None) == (kind == "column")]
            self.suites[kind] = self.context.suites.add(gx.ExpectationSuite(name=f"{name}_{kind}_suite"))
            for exp in chosen:
                self.suites[kind].add_expectation(exp)
        self.order = [e.id for e in expectations]  # ids the suites gave them, as their results carry them
        self.records: dict[str, dict] = {}
        self.rows = 0

    def _validate(self, kind: str, frame: pd.DataFrame):
        batch = self.batch_def.get_batch(batch_parameters={"dataframe": frame})
        return batch.validate(
            self.suites[kind], result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES_SHOWN}
        )

    def add(self, frame: pd.DataFrame) -> None:
        """Validate one chunk: rows in increasing row number (the frame's index)."""
        self.rows += len(frame)
        if not self.suites["column"].expectations:
            return
        for r in self._validate("column", frame).results:
            rec = _expectation_record(r, frame)
            key = r.expectation_config.id
            if key not in self.records:
                self.records[key] = rec
                continue
            seen = self.records[key]
            seen["success"] = seen["success"] and rec["success"]
            for count in ("unexpected_count", "element_count"):
                if count in rec:
                    seen[count] = seen.get(count, 0) + rec[count]
            seen["_examples"] = sorted(seen.get("_examples", []) + rec.get("_examples", []))[:EXAMPLES_SHOWN]
            if "error" in rec:
                seen.setdefault("error", rec["error"])

    def result(self) -> SuiteResult:
        if self.rows == 0:  # no chunk: the column expectations see the empty table
            self.add(pd.DataFrame(columns=self.columns))
        if self.suites["table"].expectations:
            for r in self._validate("table", pd.DataFrame(index=pd.RangeIndex(self.rows))).results:
                self.records[r.expectation_config.id] = _expectation_record(r, None)
        out = []
        for key in self.order:
            rec = self.records[key]
            if "_examples" in rec:
                rec["examples"] = [where for _, where in rec.pop("_examples")]
            out.append(rec)
        failed = sum(not e["success"] for e in out)
        return SuiteResult(self.name, failed == 0, len(out), failed, self.rows, out)


def _expectation_record(r, frame: pd.DataFrame | None) -> dict:
    cfg = r.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    rec = {"expectation": cfg.type, "kwargs": kwargs, "success": bool(r.success)}
    res = r.result or {}
    if "unexpected_count" in res and frame is not None:
        rec["unexpected_count"] = int(res["unexpected_count"])
        rec["element_count"] = int(res.get("element_count", len(frame)))
        index = [int(i) for i in res.get("partial_unexpected_index_list") or []][:EXAMPLES_SHOWN]
        if not index and not r.success:  # some versions give no indices: find the rows again
            index = _failing_rows(frame, kwargs)
        rec["_examples"] = [(i, str(frame.at[i, "where"])) for i in index]
    if "observed_value" in res:
        rec["observed_value"] = res["observed_value"]
    if r.exception_info and r.exception_info.get("raised_exception"):
        rec["error"] = str(r.exception_info.get("exception_message"))
    return rec


def _failing_rows(frame: pd.DataFrame, kwargs: dict) -> list[int]:
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
    return [int(i) for i in frame.index[bad][:EXAMPLES_SHOWN]]


def chunks(frames: Iterable[pd.DataFrame], rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """Consecutive frames joined into chunks of about `rows` rows."""
    parts, n = [], 0
    for frame in frames:
        parts.append(frame)
        n += len(frame)
        if n >= rows:
            yield pd.concat(parts)
            parts, n = [], 0
    if parts:
        yield pd.concat(parts)


def partitioned(
    rows: Iterable[dict], total: int, key: str, columns: list[str], spill: Path, size: int = CHUNK_ROWS
) -> Iterator[pd.DataFrame]:
    """`rows` (about `total` of them) as frames of about `size` rows, dealt by a hash of `key` (rows without one by
    their number): equal keys fall in one frame. Above one frame's worth, the partitions wait in files under
    `spill` (an existing folder the caller removes), a JSON line per row (values JSON holds: str, int, bool)."""
    parts = max(1, -(-total // size))
    if parts == 1:
        batch = list(rows)
        yield pd.DataFrame(batch, columns=columns, index=pd.RangeIndex(len(batch)))
        return
    buffers: list[list[str]] = [[] for _ in range(parts)]
    files = [open(spill / f"part-{k:05d}.jsonl", "w", encoding="utf-8") for k in range(parts)]
    try:
        for number, row in enumerate(rows):
            value = row.get(key)
            k = number % parts if value is None else zlib.crc32(str(value).encode("utf-8", "replace")) % parts
            buffers[k].append(json.dumps([number, [row[c] for c in columns]]) + "\n")
            if len(buffers[k]) >= SPILL_ROWS:
                files[k].write("".join(buffers[k]))
                buffers[k] = []
        for k in range(parts):
            files[k].write("".join(buffers[k]))
    finally:
        for f in files:
            f.close()
    del buffers
    for k in range(parts):
        path = spill / f"part-{k:05d}.jsonl"
        with open(path, encoding="utf-8") as f:
            part = [json.loads(line) for line in f]
        path.unlink()
        part.sort(key=lambda item: item[0])
        yield pd.DataFrame([values for _, values in part], columns=columns, index=[n for n, _ in part])
