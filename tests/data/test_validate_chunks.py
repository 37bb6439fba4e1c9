"""The gate in bounded chunks: the same expectations and the same results, byte for byte, as one Great
Expectations batch over every row; duplicates found across chunks; the rows spilled to disk are removed."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from llava_core.data import chunked_suite
from llava_core.data.chunked_suite import ChunkedSuite, partitioned
from llava_core.data.hdf5_writer import build_hdf5
from llava_core.data.validate import validate_phase
from tests.helpers_hdf5 import TEXT_ONLY_EXTRA, small_workspace

DUPLICATE = {"id": "it_000003", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}
BAD = ["{broken", {"id": "odd", "conversations": [{"from": "human", "value": "Q?"}]}, DUPLICATE, TEXT_ONLY_EXTRA,
       {**DUPLICATE, "id": "it_000011"}, {**TEXT_ONLY_EXTRA, "id": None}, DUPLICATE]  # fmt: skip


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    cfg = small_workspace(tmp_path_factory.mktemp("chunks"), extra={"shapes_instruct": BAD})
    build_hdf5(cfg, "phase2")
    return cfg


@pytest.mark.parametrize("chunk_rows", [1, 3, 8])
def test_chunks_give_the_whole_tables_results(cfg, chunk_rows):
    whole = validate_phase(cfg, "phase2", chunk_rows=10**9)  # one GX batch per suite: the reference
    reference = whole.path.read_bytes()
    chunked = validate_phase(cfg, "phase2", chunk_rows=chunk_rows)
    assert chunked.path.read_bytes() == reference
    saved = json.loads(reference)
    key = next(e for e in saved["suites"]["jsonl"]["expectations"] if e["expectation"].endswith("to_be_unique"))
    # it_000003 three times, it_000011 twice: every occurrence is a failing row, the first five named in order
    assert key["unexpected_count"] == 5 and key["element_count"] == 27
    assert key["examples"] == [f"shapes_instruct.jsonl:{n}" for n in (4, 12, 23, 25, 27)]
    assert not saved["success"] and saved["suites"]["hdf5"]["rows"] == whole.suites["hdf5"].rows
    assert not list(cfg.path("hdf5").glob(".*partial"))  # the spilled partitions are gone


def test_partitions_put_equal_keys_together_in_row_order(tmp_path, monkeypatch):
    monkeypatch.setattr(chunked_suite, "SPILL_ROWS", 3)
    rows = [{"k": f"key{n % 7}" if n % 5 else None, "v": n} for n in range(100)]
    frames = list(partitioned(iter(rows), 100, "k", ["k", "v"], tmp_path, size=15))
    assert len(frames) == 7 and not list(tmp_path.iterdir())
    assert sorted(i for f in frames for i in f.index) == list(range(100))
    for f in frames:
        assert list(f.index) == sorted(f.index) and (f["v"] == f.index).all()
    homes = {}
    for k, f in enumerate(frames):
        for key in f["k"].dropna():
            assert homes.setdefault(key, k) == k  # one partition per key


def test_no_rows_and_rows_in_two_chunks():
    import great_expectations.expectations as gxe

    def exps() -> list:  # an expectation belongs to one suite
        return [gxe.ExpectTableRowCountToBeBetween(min_value=1), gxe.ExpectColumnValuesToNotBeNull(column="x")]

    empty = ChunkedSuite("empty", exps(), ["where", "x"]).result()
    assert empty.rows == 0 and [e["success"] for e in empty.expectations] == [False, True]
    assert empty.expectations[0]["observed_value"] == 0
    suite = ChunkedSuite("some", exps(), ["where", "x"])
    for start in (0, 2):
        suite.add(pd.DataFrame({"where": ["a", "b"], "x": [1, None]}, index=[start, start + 1]))
    r = suite.result()
    assert r.rows == 4 and r.expectations[0]["observed_value"] == 4
    assert r.expectations[1]["unexpected_count"] == 2 and r.expectations[1]["examples"] == ["b", "b"]
