"""HDF5 stage on a tiny synthetic workspace, read back with plain h5py (docs/formats.md)."""

from __future__ import annotations

import json
import pickle
from collections import Counter

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from llava_core.data.convert import convert
from llava_core.data.hdf5_writer import build_hdf5
from llava_core.data.prompts import PROMPT_SUFFIXES
from llava_core.data.sources import download
from llava_core.params import load_config
from llava_core.presets import PRESETS
from llava_core.training.dataset import LlavaHdf5Dataset, collate_trimmed
from tests.helpers_hdf5 import TEXT_ONLY_EXTRA, answers_of, example_rows, jsonl_records, read_phase, supervised_answers
from tests.helpers_unit import TINY_TOKENIZER, base_params, write_params, write_png, write_truncated_png

PHASES = ("phase1", "phase2")
_VISION = PRESETS["tiny"]()["model"]["vision_config"]
IMAGE_SIZE = _VISION["image_size"]
NUM_PATCHES = (_VISION["image_size"] // _VISION["patch_size"]) ** 2


def _qa(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


# (reason, record) appended to the converted phase-2 jsonl before building
REJECTED = [
    (
        "image_missing",
        {
            "id": "bad_missing",
            "image": "extra/missing.png",
            "conversations": _qa("<image>\nWhat color is the circle?", "red"),
        },
    ),
    (
        "image_undecodable",
        {
            "id": "bad_trunc",
            "image": "extra/trunc.png",
            "conversations": _qa("<image>\nWhat color is the circle?", "red"),
        },
    ),
    (
        "image_placeholder_count",
        {
            "id": "bad_two",
            "image": "extra/two.png",
            "conversations": _qa("<image>\n<image>\nWhat color is the circle?", "red"),
        },
    ),
    (
        "longer_than_msl",
        {
            "id": "bad_long",
            "image": "extra/long.png",
            "conversations": _qa("<image>\nDescribe the image.", " ".join(["circle"] * 300)),
        },
    ),
    (
        "image_too_small",
        {"id": "bad_small", "image": "extra/small.png", "conversations": _qa("<image>\nWhat color?", "red")},
    ),
    (
        "image_path_outside_root",
        {"id": "bad_escape", "image": "../outside.png", "conversations": _qa("<image>\nWhat color?", "red")},
    ),
    ("malformed_record", '{"id": "bad_json", "conversations": [{"from": "human"'),
    (
        "odd_number_of_turns",  # its image is truncated too: the cheap checks count first, nothing is decoded
        {"id": "bad_odd", "image": "extra/odd.png", "conversations": _qa("<image>\nWhat color?", "red")[:1]},
    ),
]
# accepted and counted as a note: a GIF named .jpg is decoded as the GIF it is
GIF_AS_JPG = {"id": "gif_jpg", "image": "extra/gif.jpg", "conversations": _qa("<image>\nWhat is it?", "A grey box.")}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("hdf5ws")
    params = base_params(root)
    params["hdf5"]["phase2"]["shard_size"] = 8  # several files, so the reader crosses file boundaries
    cfg = load_config(write_params(root, params))
    download(cfg, "synthetic_shapes")
    for ds in ("shapes_pretrain", "shapes_instruct"):
        res = convert(cfg, ds)
        assert res.written == 20 and res.dropped == {}
    extra = cfg.image_root / "extra"
    write_truncated_png(extra / "trunc.png")
    write_truncated_png(extra / "odd.png")
    write_png(extra / "two.png")
    write_png(extra / "long.png")
    write_png(extra / "small.png", size=(4, 4))
    write_png(cfg.image_root.parent / "outside.png")
    Image.new("L", (20, 12), 90).save(extra / "gif.jpg", format="GIF")
    with open(cfg.jsonl_path("shapes_instruct"), "a") as f:
        f.write(json.dumps(TEXT_ONLY_EXTRA) + "\n")
        f.write(json.dumps(GIF_AS_JPG) + "\n")
        for _, rec in REJECTED:
            f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    with open(cfg.jsonl_path("shapes_pretrain"), "a") as f:  # phase 1 trains on images only
        f.write(json.dumps({"id": "pt_text", "conversations": _qa("Describe.", "Nothing.")}) + "\n")
    results = {phase: build_hdf5(cfg, phase) for phase in PHASES}
    return cfg, results


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


@pytest.mark.parametrize("phase", PHASES)
def test_files_open_with_plain_h5py(ws, phase):
    cfg, results = ws
    folder = cfg.hdf5_dir(phase)
    params = json.loads((folder / "data_params.json").read_text())
    msl = cfg.hdf5[phase].max_sequence_length
    assert params["settings"]["max_sequence_length"] == msl
    assert params["phase"] == phase
    total = 0
    for entry in params["files"]:
        with h5py.File(folder / entry["file"], "r") as h5:
            n = int(h5.attrs["n_examples"])
            assert n == entry["n_examples"]
            d = h5["data"]
            assert d.dtype == np.int32
            assert d.shape == (n, 4, msl)
            assert d.chunks == (1, 4, msl)
            assert h5["img_path"].shape == (n, 1)
            total += n
    assert total == params["examples"] == results[phase].examples
    assert results[phase].path == folder
    expected_files = ["data-00000.h5"] if phase == "phase1" else [f"data-{k:05d}.h5" for k in range(3)]
    assert [f["file"] for f in params["files"]] == expected_files
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected_files + ["data_params.json"])
    assert not folder.with_name(f".{phase}.partial").exists()


@pytest.mark.parametrize("phase", PHASES)
def test_labels_are_inputs_shifted_left(ws, phase):
    """Cerebras' rows: inputs = tokens[:-1], labels = tokens[1:]; the final `</s>` is a label only."""
    cfg, _ = ws
    params, data, _ = read_phase(cfg.hdf5_dir(phase))
    pad, eos = params["pad_id"], params["eos_id"]
    for row in data:
        n = int((row[3] == 0).nonzero()[0].max()) + 1  # the inputs
        tokens = np.concatenate([row[0, :n], row[2, n - 1 : n]])
        np.testing.assert_array_equal(row[0, :n], tokens[:-1])
        np.testing.assert_array_equal(row[2, :n], tokens[1:])
        assert tokens[-1] == eos and eos not in row[0, n - 1 : n]
        assert (row[0, n:] == pad).all() and (row[2, n:] == pad).all()


@pytest.mark.parametrize("phase", PHASES)
def test_loss_tokens_decode_to_the_record_answers(ws, tok, phase):
    cfg, _ = ws
    params, data, paths = read_phase(cfg.hdf5_dir(phase))
    assert params["eos_id"] == tok.eos_token_id and params["pad_id"] == tok.pad_token_id
    assert params["bos_id"] == tok.bos_token_id and params["vocab_size"] == len(tok)
    records = jsonl_records(params, cfg.root)
    by_image = {r["image"]: r for r in records if "image" in r}
    assert len(by_image) == sum("image" in r for r in records)  # image paths are unique per record
    text_only_answers = Counter(tuple(answers_of(r, cfg.hdf5[phase].prompt_style)) for r in records if "image" not in r)
    seen_text_only: Counter = Counter()
    seen_images = set()
    for row, path in zip(data, paths, strict=True):
        got = supervised_answers(row, tok)
        if path == "None":
            seen_text_only[got] += 1
        else:
            assert got == tuple(answers_of(by_image[path], cfg.hdf5[phase].prompt_style)), path
            seen_images.add(path)
    if phase == "phase2":
        assert seen_text_only == text_only_answers
        assert ("4", "A triangle has 3 sides.") in seen_text_only
        assert params["text_only_examples"] == sum(text_only_answers.values()) >= 1
    else:
        assert not seen_text_only and params["text_only_examples"] == 0
    rejected_paths = {rec["image"] for _, rec in REJECTED if isinstance(rec, dict)}
    assert seen_images == set(by_image) - rejected_paths


@pytest.mark.parametrize("phase", PHASES)
def test_image_slots_and_key_padding(ws, tok, phase):
    cfg, _ = ws
    params, data, paths = read_phase(cfg.hdf5_dir(phase))
    info = params["image_patch_info"]
    start, n_patches = info["image_patch_start_idx"], info["num_patches"]
    assert n_patches == NUM_PATCHES
    if phase == "phase1":
        assert start == 1
    else:
        system = (
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the user's questions. USER: "
        )
        assert start == 1 + len(tok.encode(system, add_special_tokens=False)) == 26
    pad, eos = params["pad_id"], params["eos_id"]
    msl = data.shape[2]
    slots = slice(start, start + n_patches)
    for row, path in zip(data, paths, strict=True):
        ids, loss, kpm = row[0], row[1], row[3]
        assert ids[0] == tok.bos_token_id
        assert (ids[slots] == pad).all()
        # loss is aligned with labels: the positions whose target is an image slot are never supervised
        assert (loss[start - 1 : start + n_patches - 1] == 0).all()
        assert (kpm[slots] == (1 if path == "None" else 0)).all()
        # the inputs end before the last EOS (a label); key_padding_mask is 1 exactly after them
        n = int(np.nonzero(row[2] == eos)[0].max()) + 1
        assert (ids[n:] == pad).all()
        assert (kpm[n:] == 1).all()
        outside = np.ones(msl, dtype=bool)
        outside[slots] = False
        outside[n:] = False
        assert (kpm[outside] == 0).all()
        assert loss[n - 1] == 1 and (loss[n:] == 0).all()  # the final `</s>` is supervised, nothing past it
    # text-only examples really are the "None" ones
    assert sum(p == "None" for p in paths) == params["text_only_examples"]


@pytest.mark.parametrize("phase", PHASES)
def test_counts_and_token_stats(ws, phase):
    cfg, results = ws
    params, data, _ = read_phase(cfg.hdf5_dir(phase))
    n_lines = sum(
        1 for p in params["settings"]["inputs"] for line in (cfg.root / p).read_text().splitlines() if line.strip()
    )
    assert params["processed"] == n_lines == results[phase].processed
    assert params["processed"] == params["examples"] + params["discarded"]
    assert params["discarded"] == sum(params["discarded_by_reason"].values())
    stats = params["token_stats"]
    assert stats["loss_valid_tokens"] == int(data[:, 1].sum())
    assert stats["non_pad_tokens"] == int((data[:, 3] == 0).sum())
    assert stats["num_tokens"] == data.shape[0] * data.shape[2]
    assert stats["supervised_fraction"] == pytest.approx(stats["loss_valid_tokens"] / stats["non_pad_tokens"])
    assert params["settings"]["prompt_style"] == cfg.hdf5[phase].prompt_style


def test_rejections_are_counted_by_reason(ws):
    cfg, results = ws
    params, _, paths = read_phase(cfg.hdf5_dir("phase2"))
    assert params["discarded_by_reason"] == {reason: 1 for reason, _ in REJECTED}
    assert results["phase2"].discarded == {reason: 1 for reason, _ in REJECTED}
    assert params["examples"] == 22  # 20 converted + the extra text-only record + the GIF named .jpg
    assert not {rec["image"] for _, rec in REJECTED if isinstance(rec, dict)} & set(paths)
    assert params["image_notes"] == {"format_differs_from_extension": 1} == results["phase2"].image_notes
    assert GIF_AS_JPG["image"] in paths
    p1 = json.loads((cfg.hdf5_dir("phase1") / "data_params.json").read_text())
    assert p1["discarded_by_reason"] == {"phase1_without_image": 1}
    assert p1["examples"] == 20


def _ends_with(value: str) -> str:
    """Which evaluation suffix a human turn ends with, the `<image>` placeholder taken out (an independent reading)."""
    text = value.replace("<image>", "").strip()
    return next((n for n, s in PROMPT_SUFFIXES.items() if s and text.endswith(s)), "none")


def test_question_suffixes_count_the_human_turns_of_the_examples(ws):
    """data_params.json: per dataset, the human turns of the examples written (rejected records not counted) by
    the evaluation suffix they end with; the synthetic instructions carry short_answer on their first turn."""
    cfg, _ = ws
    rejected = {rec["id"] for _, rec in REJECTED if isinstance(rec, dict)} | {"pt_text"}
    for phase, dataset in (("phase1", "shapes_pretrain"), ("phase2", "shapes_instruct")):
        expected, with_image = dict.fromkeys(PROMPT_SUFFIXES, 0), 0
        for line in cfg.jsonl_path(dataset).read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the malformed record
            if rec["id"] not in rejected:
                with_image += rec["id"].startswith("it_") and "image" in rec
                for turn in rec["conversations"][::2]:
                    expected[_ends_with(turn["value"])] += 1
        params = json.loads((cfg.hdf5_dir(phase) / "data_params.json").read_text())
        assert params["question_suffixes"] == {dataset: expected}
    # one short_answer turn per synthetic conversation with an image: its first
    assert (
        expected["short_answer"] == with_image > 0
        and expected["none"] > with_image
        and expected["multiple_choice"] == 0
    )


def test_reader_returns_tensors(ws):
    cfg, _ = ws
    folder = cfg.hdf5_dir("phase2")
    params, data, paths = read_phase(folder)
    msl = data.shape[2]
    ds = LlavaHdf5Dataset(folder, cfg.image_root, IMAGE_SIZE)
    assert len(ds) == data.shape[0]
    assert ds.image_start == params["image_patch_info"]["image_patch_start_idx"]
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"input_ids", "loss_mask", "labels", "attention_mask", "pixel_values", "has_image"}
        for k in ("input_ids", "loss_mask", "labels", "attention_mask"):
            assert item[k].shape == (msl,)
            assert item[k].dtype == torch.int64
        assert torch.equal(item["input_ids"], torch.from_numpy(data[i, 0]).long())
        assert torch.equal(item["loss_mask"], torch.from_numpy(data[i, 1]).long())
        assert torch.equal(item["labels"], torch.from_numpy(data[i, 2]).long())
        assert torch.equal(item["attention_mask"], 1 - torch.from_numpy(data[i, 3]).long())
        assert item["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert item["pixel_values"].dtype == torch.float32
        assert bool(item["has_image"]) == (paths[i] != "None")
        if paths[i] == "None":
            assert torch.count_nonzero(item["pixel_values"]) == 0
        else:
            assert item["pixel_values"].abs().sum() > 0
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_collate_trims_padding_but_keeps_loss(ws):
    cfg, _ = ws
    folder = cfg.hdf5_dir("phase2")
    ds = LlavaHdf5Dataset(folder, cfg.image_root, IMAGE_SIZE)
    msl = cfg.hdf5["phase2"].max_sequence_length
    items = [ds[i] for i in range(min(8, len(ds)))]
    batch = collate_trimmed(items)
    lengths = [int(it["attention_mask"].nonzero().max()) + 1 for it in items]
    length = max(lengths)
    assert length < msl
    b = len(items)
    for k in ("input_ids", "loss_mask", "labels", "attention_mask"):
        assert batch[k].shape == (b, length)
        full = torch.stack([it[k] for it in items])
        assert torch.equal(batch[k], full[:, :length])
    assert batch["pixel_values"].shape == (b, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["has_image"].shape == (b,)
    # every loss position survives; every trimmed column is padding nobody attends to
    full_loss = torch.stack([it["loss_mask"] for it in items])
    assert int(batch["loss_mask"].sum()) == int(full_loss.sum()) > 0
    full_attn = torch.stack([it["attention_mask"] for it in items])
    assert int(full_attn[:, length:].sum()) == 0
    assert bool(batch["attention_mask"][:, -1].any())  # the last kept column is attended by someone
    # a single example is trimmed to its own length
    one = collate_trimmed([items[0]])
    assert one["input_ids"].shape == (1, lengths[0])


def test_example_rows_by_hand():
    # tokens: BOS, 2 slots, "a" "b", EOS; loss on "a" "b" EOS. Rows: inputs tokens[:-1], labels tokens[1:]
    ids, loss = [1, 0, 0, 7, 8, 2], [0, 0, 0, 1, 1, 1]
    block = example_rows(ids, loss, msl=8, pad_id=0, image_start=1, num_patches=2, has_image=True)
    assert block.dtype == np.int32 and block.shape == (4, 8)
    assert block[0].tolist() == [1, 0, 0, 7, 8, 0, 0, 0]
    assert block[2].tolist() == [0, 0, 7, 8, 2, 0, 0, 0]
    assert block[1].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]  # aligned with labels: labels 7, 8, 2
    assert block[3].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]  # the final EOS is no input
    text = example_rows(ids, loss, msl=8, pad_id=0, image_start=1, num_patches=2, has_image=False)
    assert text[3].tolist() == [0, 1, 1, 0, 0, 1, 1, 1]
    full = example_rows(ids, loss, msl=6, pad_id=0, image_start=1, num_patches=2, has_image=True)
    assert full[3].tolist() == [0] * 5 + [1]
    assert full[1].tolist() == [0, 0, 1, 1, 1, 0]
    assert full[2].tolist() == [0, 0, 7, 8, 2, 0]


def test_a_task_packs_each_row_as_it_packs_that_row_alone():
    """Rows of different lengths (one of exactly MSL tokens), with and without images, packed together in one
    call: each block equals the block of that example packed alone (test_example_rows_by_hand)."""
    from llava_core.data.hdf5_examples import pack_examples

    rng = np.random.default_rng(0)
    examples = []
    for k, size in enumerate((6, 9, 12, 7, 3)):
        ids = [1, *rng.integers(3, 500, size - 2).tolist(), 2]
        examples.append((ids, rng.integers(0, 2, size).tolist(), k % 2 == 0))
    packed = pack_examples(examples, 12, 0, 1, 2)
    assert packed.shape == (5, 4, 12) and packed.dtype == np.int32
    for block, (ids, loss, has_image) in zip(packed, examples, strict=True):
        alone = example_rows(ids, loss, msl=12, pad_id=0, image_start=1, num_patches=2, has_image=has_image)
        assert block.tolist() == alone.tolist()
        m = len(ids) - 1
        assert block[0, :m].tolist() == ids[:-1] and block[2, :m].tolist() == ids[1:]
        assert block[1, :m].tolist() == loss[1:] and block[3, m:].tolist() == [1] * (12 - m)


def test_build_fails_loudly_without_input(tmp_path):
    params = base_params(tmp_path / "ws")
    cfg = load_config(write_params(tmp_path, params))
    with pytest.raises(FileNotFoundError, match="run the conversion stage first"):
        build_hdf5(cfg, "phase1")
    with pytest.raises(KeyError, match="unknown phase 'phase3'"):
        build_hdf5(cfg, "phase3")


def test_reader_with_two_loader_workers_matches_direct_reads(ws):
    """Handles opened in the parent are never shared: two forked loader workers read every example right."""
    from torch.utils.data import DataLoader

    cfg, _ = ws
    ds = LlavaHdf5Dataset(cfg.hdf5_dir("phase2"), cfg.image_root, IMAGE_SIZE)
    direct = [ds[i] for i in range(len(ds))]  # opens handles in this process first
    assert ds.data._handles
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(3)).tolist()  # random access
    loader = DataLoader(torch.utils.data.Subset(ds, order), batch_size=5, num_workers=2)
    got = {k: torch.cat([b[k] for b in loader]) for k in ("input_ids", "labels", "loss_mask", "pixel_values")}
    for k, value in got.items():
        assert torch.equal(value, torch.stack([direct[i][k] for i in order])), k
    # a spawned worker gets the dataset pickled: without the parent's handles, reading the same
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.data._handles == {} and torch.equal(clone[len(ds) - 1]["input_ids"], direct[-1]["input_ids"])


def test_random_access_keeps_a_bounded_number_of_shards_open(ws, monkeypatch):
    """Reading examples at random over more shards than the bound holds at most MAX_OPEN_FILES open, closes the
    least recently used first, and reads the same examples as with every file open."""
    from llava_core.data import hdf5_format

    cfg, _ = ws
    folder = hdf5_format.Hdf5Folder(cfg.hdf5_dir("phase2"))
    assert len(folder.files) >= 3
    want = [folder.example(i)[0] for i in range(len(folder))]  # every shard open (the bound is above the count)
    monkeypatch.setattr(hdf5_format, "MAX_OPEN_FILES", 2)
    bounded = hdf5_format.Hdf5Folder(cfg.hdf5_dir("phase2"))
    order = np.random.default_rng(5).permutation(len(bounded))
    for i in order:
        assert np.array_equal(bounded.example(int(i))[0], want[i])
        assert len(bounded._handles) <= 2
    kept = list(bounded._handles.values())
    last = int(np.searchsorted(bounded.offsets, order[-1], side="right") - 1)
    assert list(bounded._handles)[-1] == last and all(h.id.valid for h in kept)  # the last used is kept


def test_nothing_surviving_is_an_error_naming_the_reasons_and_leaves_nothing(tmp_path):
    cfg = load_config(write_params(tmp_path, base_params(tmp_path / "ws")))
    for ds in ("shapes_pretrain", "shapes_instruct"):
        cfg.jsonl_path(ds).parent.mkdir(parents=True, exist_ok=True)
        cfg.jsonl_path(ds).write_text("not json\n{}\n")
    with pytest.raises(ValueError, match=r"phase2: no example survived \(\{'malformed_record': 2\}\) out of 2 records"):
        build_hdf5(cfg, "phase2")
    assert not cfg.hdf5_dir("phase2").exists()
    assert list(cfg.hdf5_dir("phase2").parent.iterdir()) == []  # no temporary folder left either
