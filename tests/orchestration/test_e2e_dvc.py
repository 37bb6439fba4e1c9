"""DVC as its users expect, on two temporary git + DVC repositories of the small workspace at different paths:

- `llava-pipeline all` records every stage in dvc.lock: `dvc status` is clean and `dvc repro` runs nothing;
- `dvc repro` in the other copy writes the same dvc.lock, hash for hash (no absolute path in any output);
- an edit to a function training uses re-runs training only; a changed image re-runs its phase only;
- the trackers: DVCLive's folder per phase, MLflow and W&B (offline) runs with the same loss curve.
The experiments and the model registry on the same repository: tests/orchestration/test_e2e_experiments.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from llava_core.artifacts import METRICS
from llava_core.training.observe import read_metrics
from orchestration.dvc import DvcIgnore, file_md5
from tests.conftest import PROJECT
from tests.orchestration.conftest import changed_stages, run

pytestmark = pytest.mark.e2e

STAGES = {
    "download_synthetic_shapes",
    "download_shapes_b",
    "convert_shapes_pretrain",
    "convert_shapes_instruct",
    "hdf5_phase1",
    "hdf5_phase2",
    "validate_phase1",
    "validate_phase2",
    "train_phase1",
    "train_phase2",
    "export_hf",
    "export_llava",
    "evaluate",
}
PHASE1 = {"download_synthetic_shapes", "convert_shapes_pretrain", "hdf5_phase1", "validate_phase1", "train_phase1"}
OUTPUTS = ("data", "checkpoints", "models", "reports")


def test_all_leaves_a_recorded_workspace(recorded):
    repo, env = recorded
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == STAGES
    assert "Data and pipelines are up to date." in run(["dvc", "status"], repo, env)
    assert "Running stage" not in run(["dvc", "repro"], repo, env)  # nothing to do


def test_dvc_repro_runs_every_stage(reproduced):
    repo, env = reproduced
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == STAGES
    report = json.loads((repo / "reports/eval.json").read_text())
    assert report["num_questions"] == 7 * 2  # 7 questions for each of the 2 held-out images
    assert (repo / "models/hf/config.json").is_file()
    assert "up to date" in run(["dvc", "status"], repo, env)
    assert "Running stage" not in run(["dvc", "repro"], repo, env)


def lock_entries(repo: Path) -> dict[str, object]:
    """Every hash and value dvc.lock records: `stage deps|outs path` -> md5, `stage params file` -> values."""
    out: dict[str, object] = {}
    for name, stage in yaml.safe_load((repo / "dvc.lock").read_text())["stages"].items():
        out[f"{name} cmd"] = stage["cmd"]
        for field in ("deps", "outs"):
            for item in stage.get(field, []):
                out[f"{name} {field} {item['path']}"] = item["md5"]
        for file, values in stage.get("params", {}).items():
            out[f"{name} params {file}"] = values
    return out


def output_files(repo: Path, rel: str) -> dict[str, str]:
    """md5 of every file of an output DVC hashes (its .dvcignore applied), by path inside the repository."""
    ignore, root = DvcIgnore(repo), repo / rel
    files = [root] if root.is_file() else [p for p in sorted(root.rglob("*")) if p.is_file()]
    return {p.relative_to(repo).as_posix(): file_md5(p) for p in files if not ignore.ignored(p)}


def test_two_copies_at_different_paths_agree_on_every_hash(recorded, reproduced):
    """The CLI in one copy, `dvc repro` in the other: every dep and output hash and every params value of dvc.lock
    is the same (a difference names the files that differ); no output holds the repository's absolute path."""
    (a, _), (b, _) = recorded, reproduced
    la, lb = lock_entries(a), lock_entries(b)
    assert set(la) == set(lb)
    problems = []
    for key in sorted(la):
        if la[key] != lb[key]:
            path = key.split(" ", 2)[2]
            files = output_files(a, path) if (a / path).exists() else {}
            other = output_files(b, path) if (b / path).exists() else {}
            differ = sorted(f for f in set(files) | set(other) if files.get(f) != other.get(f))
            problems.append(f"{key}: {la[key]} != {lb[key]}; files that differ: {differ}")
    assert problems == []
    # portable outputs: nothing names the checkout (text or binary, ignored files too), but the stage guard's
    # locks and run records beside the outputs: this machine's bookkeeping (pid, host, paths), in no output and
    # ignored by git
    local = re.compile(r"\..+\.(lock|run\.json)")
    for repo in (a, b):
        needle = str(repo).encode()
        found = [
            p.relative_to(repo).as_posix()
            for out in OUTPUTS
            for p in (repo / out).rglob("*")
            if p.is_file() and not local.fullmatch(p.name) and needle in p.read_bytes()
        ]
        assert found == [], f"absolute paths of {repo} in {found}"


def test_an_edit_to_a_function_training_uses_reruns_training(recorded):
    repo, env = recorded
    module = repo / "llava_core/training/dataset.py"  # the collate function the training loader uses
    before = module.read_text()
    try:
        module.write_text(before.replace("def collate_trimmed(", "def collate_trimmed(  # edited\n", 1))
        assert changed_stages(run(["dvc", "status"], repo, env)) == {"train_phase1", "train_phase2"}
    finally:
        module.write_text(before)
    assert "up to date" in run(["dvc", "status"], repo, env)


def test_a_changed_image_reruns_its_phase_only(recorded):
    """An image of phase 2's source changes (its JSON does not): phase 2's conversion, data, gate and training are
    out of date, and nothing of phase 1 (`dvc status` lists what `dvc repro` runs first)."""
    repo, env = recorded
    image = repo / "data/raw/shapes_b/images/it_000001.png"
    before = image.read_bytes()
    try:
        from PIL import Image

        Image.new("RGB", (64, 64), (10, 200, 30)).save(image)
        changed = changed_stages(run(["dvc", "status"], repo, env))
        assert changed == {"download_shapes_b", "convert_shapes_instruct", "hdf5_phase2", "validate_phase2",
                           "train_phase2"}  # fmt: skip
        assert not changed & PHASE1
    finally:
        image.write_bytes(before)
    assert "up to date" in run(["dvc", "status"], repo, env)


def test_each_tracker_writes_the_run_metrics(recorded):
    """Phase 1 logged to DVCLive (reports/train/phase1, in git), TensorBoard, MLflow and W&B: each holds the loss of
    every logged step, as metrics.jsonl has it; phase 2 to the default trackers only."""
    repo, env = recorded
    records = read_metrics(repo / "checkpoints/phase1" / METRICS)
    losses = [(r["step"], r["loss"]) for r in records]
    assert losses and all(isinstance(v, float) for _, v in losses)
    live = repo / "reports/train/phase1"
    rows = (live / "plots/metrics/loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tloss" and [(int(s), float(v)) for s, v in (r.split("\t") for r in rows[1:])] == losses
    assert json.loads((live / "metrics.json").read_text())["loss"] == losses[-1][1]
    assert (repo / "reports/train/phase2/metrics.json").is_file()
    assert list((repo / "checkpoints/phase1/tensorboard").glob("events.out.tfevents.*"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("llava-pipeline")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])  # phase 1 only
    assert mlflow_run.info.run_name == "phase1" and mlflow_run.info.status == "FINISHED"
    history = client.get_metric_history(mlflow_run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == losses
    assert mlflow_run.data.params["phase"] == "phase1" and float(mlflow_run.data.params["learning_rate"]) > 0
    assert "tokens_per_s" in mlflow_run.data.metrics  # MLflow and W&B get this machine's speed too

    (run_file,) = Path(env["WANDB_DIR"], "wandb").glob("offline-run-*/run-*.wandb")  # phase 1 only
    records = wandb_records(run_file)
    history = [r["history"] for r in records if "history" in r]
    assert [(h["_step"], h["loss"]) for h in history] == losses and "tokens_per_s" in history[-1]
    config = next(r["config"] for r in records if "config" in r)
    assert config["phase"] == "phase1" and config["learning_rate"] > 0


def wandb_records(path: Path) -> list[dict]:
    """The history and config records of an offline W&B run file, read independently of wandb's own reader: a
    7-byte file header (`:W&B`, magic, version), then LevelDB log records (4-byte checksum, 2-byte length, 1-byte
    type: full 1, first 2, middle 3, last 4) in 32 KiB blocks, each payload a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payloads, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            payloads.append(pending)
            pending = b""
    out = []
    for raw in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind in ("history", "config"):
            items = record.history.item if kind == "history" else record.config.update
            out.append({kind: {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}})
    return out


def test_training_waits_for_the_validation_gate():
    """The gate writes the file training depends on, so `dvc repro` orders validate before train and stops
    at a failing validation; the gate reads the data the hdf5 stage wrote and its own settings."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    from llava_core.params import load_config

    cfg = load_config(PROJECT / "params.yaml")
    for phase in ("phase1", "phase2"):
        gate = stages[f"validate_{phase}"]
        result = str(cfg.validation_path(phase).relative_to(PROJECT))
        assert gate["cmd"] == f"llava-pipeline validate {phase}"
        assert [next(iter(o)) if isinstance(o, dict) else o for o in gate["outs"]] == [result]
        assert f"data/hdf5/{phase}" in gate["deps"] and "llava_core/data/validate.py" in gate["deps"]
        assert f"hdf5.{phase}" in gate["params"]
        assert result in stages[f"train_{phase}"]["deps"]
        assert f"data/hdf5/{phase}" in stages[f"hdf5_{phase}"]["outs"]
