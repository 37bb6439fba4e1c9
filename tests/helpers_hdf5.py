"""Shared by the HDF5 tests: small workspaces, and reading the files back with plain h5py + json."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from llava_core.config import PipelineConfig
from llava_core.data.convert import convert
from llava_core.data.sources import download
from llava_core.params import load_config
from tests.helpers_unit import base_params, loss_runs, write_params

TEXT_ONLY_EXTRA = {
    "id": "extra_text",
    "conversations": [
        {"from": "human", "value": "How many sides does a square have?"},
        {"from": "gpt", "value": "4"},
        {"from": "human", "value": "And a triangle?"},
        {"from": "gpt", "value": "A triangle has 3 sides."},
    ],
}


def small_workspace(root: Path, extra: dict[str, list[dict | str]] | None = None, **settings) -> PipelineConfig:
    """20 + 20 synthetic records converted to jsonl, `extra` records (dicts, or raw lines) appended per dataset;
    `settings` are
    params overrides merged into the project's params (e.g. hdf5={"phase2": {"num_workers": 2}})."""
    params = base_params(root)
    for key, value in settings.items():
        for sub, inner in value.items():
            params.setdefault(key, {}).setdefault(sub, {})
            if isinstance(inner, dict):
                params[key][sub].update(inner)
            else:
                params[key][sub] = inner
    cfg = load_config(write_params(root, params))
    download(cfg, "synthetic_shapes")
    for ds in ("shapes_pretrain", "shapes_instruct"):
        convert(cfg, ds)
    for ds, records in (extra or {}).items():
        with open(cfg.jsonl_path(ds), "a") as f:
            for rec in records:
                f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    return cfg


def read_phase(folder: Path):
    """Plain h5py + json: (data_params, data (N,4,MSL), img paths as str)."""
    params = json.loads((folder / "data_params.json").read_text())
    blocks, paths = [], []
    for entry in params["files"]:
        with h5py.File(folder / entry["file"], "r") as h5:
            blocks.append(h5["data"][:])
            raw = h5["img_path"][:]
            assert raw.shape == (entry["n_examples"], 1)
            paths += [p[0].decode() if isinstance(p[0], bytes) else str(p[0]) for p in raw]
    return params, np.concatenate(blocks), paths


def jsonl_records(params, root: Path) -> list[dict]:
    """The records of the phase's jsonl files that parse (the writer rejects the others); `root`: the workspace
    root the recorded input paths are relative to."""
    recs = []
    for p in params["settings"]["inputs"]:
        for line in (Path(root) / p).read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return recs


def answers_of(rec: dict, style: str) -> list[str]:
    answers = [t["value"].strip() for t in rec["conversations"][1::2]]
    return answers[:1] if style == "plain" else answers  # plain keeps the first answer only


def supervised_answers(row: np.ndarray, tok) -> tuple[str, ...]:
    """The label tokens under the loss mask, run by run, decoded; each run must be one answer + `</s>`."""
    labels, loss = row[2], row[1]
    eos = tok.eos_token
    out = []
    for s, e in loss_runs(loss):
        assert labels[e - 1] == tok.eos_token_id
        assert tok.eos_token_id not in labels[s : e - 1].tolist()  # inside a run only the last label is EOS
        text = tok.decode(labels[s:e].tolist(), skip_special_tokens=False)
        assert text.endswith(eos), text
        out.append(text[: -len(eos)])
    return tuple(out)


def example_rows(
    enc_ids: list[int], enc_loss: list[int], msl: int, pad_id: int, image_start: int, num_patches: int, has_image: bool
):
    """One encoded conversation packed into its (4, MSL) int32 block, as the writer packs its tasks' rows."""
    from llava_core.data.hdf5_examples import pack_examples

    return pack_examples([(enc_ids, enc_loss, has_image)], msl, pad_id, image_start, num_patches)[0]
