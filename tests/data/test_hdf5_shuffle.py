"""The writer's spools and shuffle: the shards are the seeded permutation of the examples in input order (checked
against each record encoded on its own), a shard reads at most one spool per writer process, and a full disk
while spooling is the named error with nothing left behind."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llava_core.atomic import DiskFullError
from llava_core.data.hdf5_shuffle import Layout, Spool, SpoolReader, shard_jobs
from llava_core.data.hdf5_writer import build_hdf5
from llava_core.data.prompts import encode_conversation
from llava_core.data.tokenizer import load_tokenizer
from tests.helpers_hdf5 import TEXT_ONLY_EXTRA, example_rows, read_phase, small_workspace
from tests.helpers_reliability import fill, hidden_leftovers, tmpfs

TOO_LONG = {"id": "long", "conversations": [{"from": "human", "value": "Q? " * 400}, {"from": "gpt", "value": "A."}]}


@pytest.mark.parametrize("workers", [1, 3])
def test_shards_hold_the_seeded_permutation_of_the_examples_in_input_order(tmp_path, workers):
    """Each record encoded on its own (`encode_conversation`, one row), the rejected one left out, then ordered by
    `default_rng(seed).permutation`: the rows and paths of data-00000.h5, data-00001.h5, ... in turn."""
    cfg = small_workspace(
        tmp_path / "ws",
        extra={"shapes_instruct": [TEXT_ONLY_EXTRA, TOO_LONG, {**TEXT_ONLY_EXTRA, "id": "again"}]},
        hdf5={"phase2": {"num_workers": workers, "shard_size": 7}},
    )
    build_hdf5(cfg, "phase2")
    params, data, paths = read_phase(cfg.hdf5_dir("phase2"))
    tok = load_tokenizer(cfg.resolve_file(cfg.model.tokenizer))
    msl, start = params["settings"]["max_sequence_length"], params["image_patch_info"]["image_patch_start_idx"]
    patches = params["image_patch_info"]["num_patches"]
    rows, images = [], []
    for line in cfg.jsonl_path("shapes_instruct").read_text().splitlines():
        rec = json.loads(line)
        enc = encode_conversation(rec["conversations"], tok, "vicuna_v1", patches, tok.pad_token_id)
        if len(enc.input_ids) > msl:
            continue
        rows.append(example_rows(enc.input_ids, enc.loss_mask, msl, tok.pad_token_id, start, patches, "image" in rec))
        images.append(rec.get("image", "None"))
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    assert params["discarded_by_reason"] == {"longer_than_msl": 1} and len(rows) == params["examples"] == 22
    assert [f["n_examples"] for f in params["files"]] == [7, 7, 7, 1]
    np.testing.assert_array_equal(data, np.stack(rows)[order])
    assert paths == [images[k] for k in order]


def test_a_shard_reads_each_row_from_where_its_task_put_it_and_opens_one_spool_per_process():
    """Tasks of 3, 0, 4, 2 and 5 examples in input order, spread over two spools in the order the processes
    finished them: every output position gets the right (spool, row), each once, from at most two spools."""
    placements = [("s1", 0, 3), ("s0", 0, 4), ("s1", 3, 2), ("s0", 4, 5)]  # (the empty task is not placed)
    where = [(s, first + k) for s, first, n in placements for k in range(n)]  # input order -> (spool, row)
    layout = Layout.of(placements)
    order = np.random.default_rng(5).permutation(len(where))
    seen = {}
    for chunk, (out, sources, n, msl) in enumerate(shard_jobs(layout, seed=5, shard_size=4, folder="f", msl=8)):
        assert out.endswith(f"data-{chunk:05d}.h5") and msl == 8 and len(sources) <= 2
        assert n == min(4, len(where) - 4 * chunk)
        for spool, rows, positions in sources:
            assert list(rows) == sorted(rows)  # forward reads
            for row, pos in zip(rows, positions, strict=True):
                seen[4 * chunk + int(pos)] = (spool, int(row))
    assert seen == {k: where[order[k]] for k in range(len(where))}


def test_spool_round_trip(tmp_path):
    spool = Spool(tmp_path, msl=5)
    a = np.arange(2 * 4 * 5, dtype=np.int32).reshape(2, 4, 5)
    b = -np.arange(3 * 4 * 5, dtype=np.int32).reshape(3, 4, 5)
    assert spool.append(a, [b"x/a.png", b"None"]) == 0
    assert spool.append(b, ["é/ü.jpg".encode(), b"", b"y.png"]) == 2
    spool.close()
    data, paths = np.zeros((4, 4, 5), dtype=np.int32), np.empty((4, 1), dtype=object)
    reader = SpoolReader(spool.name, 5)
    reader.read(np.array([0, 3, 4, 1]), data, paths, np.array([2, 0, 3, 1]))
    reader.close()
    np.testing.assert_array_equal(data, np.stack([b[1], a[1], a[0], b[2]]))
    assert paths[:, 0].tolist() == [b"", b"None", b"x/a.png", b"y.png"]


def test_a_full_disk_while_spooling_is_named_and_leaves_nothing(tmp_path):
    cfg = small_workspace(tmp_path / "ws", hdf5={"phase2": {"num_workers": 2}})
    with open(cfg.jsonl_path("shapes_instruct"), "a") as f:  # enough examples for the spool to need room
        for k in range(3000):
            f.write(json.dumps({**TEXT_ONLY_EXTRA, "id": f"t{k}"}) + "\n")
    out = cfg.hdf5_dir("phase2")
    out.parent.mkdir(parents=True)
    with tmpfs(out.parent, "3m"):  # 3000 examples x 4 x 288 x 4 bytes = 13.8 MB of spool: it cannot fit
        filler = fill(out.parent, leave=1 << 20)
        partial = out.with_name(f".{out.name}.partial")
        with pytest.raises(DiskFullError, match=f"no space left on device while writing {partial}: {out} was not"):
            build_hdf5(cfg, "phase2")
        assert not out.exists() and not partial.exists()
        assert [n for n in hidden_leftovers(out) if n != ".filler"] == []
        filler.unlink()
