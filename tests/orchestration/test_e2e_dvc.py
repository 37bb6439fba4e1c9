"""`dvc repro` in a temporary git repository runs the same stages and leaves a complete dvc.lock."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import PROJECT, e2e_params

pytestmark = pytest.mark.e2e

STAGES = {
    "download_synthetic_shapes",
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


def run(cmd: list[str], cwd, env) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_dvc_repro_runs_every_stage(tmp_path, venv_env):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("llava_core", "configs"):
        shutil.copytree(PROJECT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "dvc.yaml", repo / "dvc.yaml")
    e2e_params(repo, root=".")
    run(["git", "init", "-q"], repo, venv_env)
    run(["dvc", "init", "-q"], repo, venv_env)
    run(["dvc", "repro"], repo, venv_env)

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == STAGES
    report = json.loads((repo / "reports/eval.json").read_text())
    assert report["num_questions"] == 7 * 4  # 7 questions for each of the 4 held-out images
    assert (repo / "models/hf/config.json").is_file()
    assert "up to date" in run(["dvc", "status"], repo, venv_env)
    # nothing changed: a second repro runs nothing
    again = run(["dvc", "repro"], repo, venv_env)
    assert "Running stage" not in again
    # a changed eval parameter re-runs the evaluation only
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["eval"]["max_new_tokens"] = 4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run(["dvc", "status"], repo, venv_env)
    assert "evaluate:" in status and "train_phase2:" not in status


def test_hdf5_stage_deps_list_every_dataset_of_the_phase():
    """dvc.yaml cannot filter datasets by phase, so its hdf5 deps are listed by hand: keep them in sync."""
    from llava_core.params import load_config

    cfg = load_config(PROJECT / "params.yaml")
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for phase in ("phase1", "phase2"):
        for stage in (f"hdf5_{phase}", f"validate_{phase}"):
            deps = {d for d in stages[stage]["deps"] if d.startswith("data/jsonl/")}
            assert deps == {f"data/jsonl/{d}.jsonl" for d in cfg.datasets_for(phase)}, stage


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
