"""The writer over several processes: byte-identical files, a seeded shuffle across files, and a run killed
while writing that leaves nothing at the final path (the next run completes)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_core.data.hdf5_writer import build_hdf5
from llava_core.params import load_config
from tests.helpers_hdf5 import TEXT_ONLY_EXTRA, read_phase, small_workspace
from tests.helpers_unit import PROJECT, base_params, write_params

EXTRA = [
    TEXT_ONLY_EXTRA,
    "not json",
    {
        "id": "gone",
        "image": "extra/none.png",
        "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}],
    },
]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def rebuild(root: Path, name: str, **hdf5) -> Path:
    """Build phase 2 of the shared workspace into its own hdf5 folder with these settings."""
    params = base_params(root)
    params["workspace"]["hdf5"] = name
    params["hdf5"]["phase2"].update(hdf5)
    cfg = load_config(write_params(root / f"cfg_{name}", params))
    build_hdf5(cfg, "phase2")
    return cfg.hdf5_dir("phase2")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("par")
    small_workspace(root, extra={"shapes_instruct": EXTRA})
    return root


def test_any_number_of_processes_writes_identical_files(root):
    one = rebuild(root, "one", num_workers=1, shard_size=6)
    for workers in (2, 3):
        many = rebuild(root, f"w{workers}", num_workers=workers, shard_size=6)
        assert digests(many) == digests(one)
    params, data, _ = read_phase(one)
    assert [f["file"] for f in params["files"]] == [f"data-{k:05d}.h5" for k in range(4)]  # 21 examples by 6
    assert params["examples"] == 21 and params["discarded_by_reason"] == {"image_missing": 1, "malformed_record": 1}
    assert data.shape[0] == 21


def test_shuffle_is_seeded_and_mixes_examples_across_files(root):
    a = rebuild(root, "seed0", shard_size=6)
    b = rebuild(root, "seed0_again", shard_size=6)
    assert digests(a) == digests(b)
    params, data, paths = read_phase(a)
    records = [json.loads(line) for line in (root / params["settings"]["inputs"][0]).read_text().splitlines()[:20]]
    position = {r["image"]: k for k, r in enumerate(records) if "image" in r}  # input order of image records
    order = [position[p] for p in paths if p in position]
    assert order != sorted(order)
    assert max(order[:5]) >= 6  # the first file holds examples from later in the input: shuffled across files

    base = base_params(root)
    base["seed"] = 1
    base["workspace"]["hdf5"] = "seed1"
    base["hdf5"]["phase2"]["shard_size"] = 6
    cfg = load_config(write_params(root / "cfg_seed1", base))
    build_hdf5(cfg, "phase2")
    params1, data1, paths1 = read_phase(cfg.hdf5_dir("phase2"))
    assert paths1 != paths
    # the same examples, in another order
    key = lambda d, p: sorted(zip((row.tobytes() for row in d), p, strict=True))  # noqa: E731
    assert key(data1, paths1) == key(data, paths)
    assert params1["token_stats"] == params["token_stats"]


KILL_SCRIPT = """
import sys
from llava_core.params import load_config
from llava_core.data.hdf5_writer import build_hdf5
if __name__ == "__main__":
    build_hdf5(load_config(sys.argv[1]), "phase2")
"""


def test_killed_writer_leaves_nothing_at_the_final_path_and_the_next_run_completes(tmp_path):
    cfg = small_workspace(tmp_path / "ws", hdf5={"phase2": {"num_workers": 2, "shard_size": 200}})
    with open(cfg.jsonl_path("shapes_instruct"), "a") as f:  # enough records for the writer to take a while
        for k in range(6000):
            f.write(json.dumps({**TEXT_ONLY_EXTRA, "id": f"t{k}"}) + "\n")
    out = cfg.hdf5_dir("phase2")
    partial = out.with_name(f".{out.name}.partial")
    script = tmp_path / "write.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ws" / "params.yaml")], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(list(partial.glob("**/*.h5"))) < 2:  # the writer is half way: some files written
            assert proc.poll() is None, "the writer finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # what the training stage reads is not there
    assert partial.exists()  # the half-written files stayed under the temporary name

    result = build_hdf5(cfg, "phase2")  # the next run (its workers' folder is new: orphans cannot write there)
    params, data, _ = read_phase(out)
    assert result.examples == params["examples"] == data.shape[0] == 20 + 6000
    assert sorted(p.name for p in out.iterdir()) == sorted([f["file"] for f in params["files"]] + ["data_params.json"])
    assert not partial.exists() and not out.with_name(f".{out.name}.old").exists()
