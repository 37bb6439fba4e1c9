"""dvc.yaml, generated from the stage table (`llava_core.dvc_yaml`): the committed file is the generated one, DVC
reads it as the table says, every stage's code deps are the modules its runner imports (checked against what
Python itself loads), a missing dependency is named, and a stage DVC starts refuses an out-of-date entry."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import yaml

from llava_core import pipeline
from llava_core.cli import main
from llava_core.dvc_yaml import code_deps, entry_problems, render, stages
from llava_core.params import load_config
from tests.helpers_unit import PROJECT, base_params, write_params


@pytest.fixture(scope="module")
def cfg():
    return load_config(PROJECT / "params.yaml")


def test_dvc_yaml_is_the_generated_one(cfg):
    found = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    problems = entry_problems(cfg, found.get("stages", {}))
    assert (PROJECT / "dvc.yaml").read_text() == render(cfg), (
        "dvc.yaml is out of date: regenerate it with `make dvc.yaml` (`llava-pipeline dvc-yaml > dvc.yaml`)\n"
        + "\n".join(problems)
    )


@pytest.fixture(scope="module")
def dvc_yaml_stages(tmp_path_factory) -> dict:
    """dvc.yaml's stages as DVC itself reads them, from a copy of the two files in an empty DVC repository."""
    import shutil

    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("dvc_yaml")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT / name, root / name)
    Repo.init(str(root), no_scm=True)
    with Repo(str(root)) as repo:
        return {
            s.name: {
                "cmd": s.cmd,
                "outs": {str(o.def_path) for o in s.outs},  # metrics and uncached outputs included
                "deps": {str(d.def_path) for d in s.deps},
                "params": {k for p in s.params for k in p.params},
            }
            for s in repo.index.stages
        }


def test_dvc_reads_the_stage_table(cfg, dvc_yaml_stages):
    """Every (stage, key) of `pipeline.STAGES` is a dvc.yaml stage of its DVC name that runs the same CLI command,
    writes the same outputs, reads the same outputs of other stages and params; dvc.yaml has no other stage."""
    steps = pipeline.steps(cfg)
    assert {s.name for s, _ in steps} == {s.name for s in pipeline.STAGES}  # every stage has a step here

    def rel(paths) -> set[str]:
        return {p.relative_to(cfg.root).as_posix() for p in paths}

    problems = []
    for s, k in steps:
        name, dvc = s.dvc_name(k), dvc_yaml_stages.get(s.dvc_name(k))
        if dvc is None:
            problems.append(f"{name}: not in dvc.yaml")
            continue
        cmd = " ".join(["llava-pipeline", s.command, *([k] if k is not None else [])])
        if dvc["cmd"] != cmd:
            problems.append(f"{name}: dvc.yaml runs {dvc['cmd']!r}, the table {cmd!r}")
        if dvc["outs"] != rel(s.outs(cfg, k)):
            problems.append(f"{name}: dvc.yaml outs {sorted(dvc['outs'])}, the table {sorted(rel(s.outs(cfg, k)))}")
        if not rel(s.deps(cfg, k)) <= dvc["deps"]:
            problems.append(f"{name}: dvc.yaml misses {sorted(rel(s.deps(cfg, k)) - dvc['deps'])}")
        if dvc["params"] != set(s.params(cfg, k)):
            problems.append(f"{name}: dvc.yaml params {sorted(dvc['params'])}, the table {s.params(cfg, k)}")
    extra = set(dvc_yaml_stages) - {s.dvc_name(k) for s, k in steps}
    problems += [f"{name}: in dvc.yaml, not in the stage table" for name in sorted(extra)]
    assert problems == []
    # the images: each phase's data and training stages read the source folders of its datasets
    for phase in ("phase1", "phase2"):
        for stage in (f"hdf5_{phase}", f"validate_{phase}", f"train_{phase}"):
            assert "data/raw/synthetic_shapes" in dvc_yaml_stages[stage]["deps"], stage


def test_a_missing_dependency_is_named(cfg):
    """The check behind the first test fails, naming the stage and the file, when dvc.yaml lacks a dependency."""
    found = copy.deepcopy(stages(cfg))
    assert entry_problems(cfg, found) == []
    found["train_phase1"]["deps"].remove("llava_core/training/dataset.py")  # the collate function's module
    found["hdf5_phase2"]["deps"].remove("data/raw/synthetic_shapes")  # the images
    del found["evaluate"]
    assert entry_problems(cfg, found) == [
        "hdf5_phase2: misses the dependency data/raw/synthetic_shapes",
        "train_phase1: misses the dependency llava_core/training/dataset.py",
        "evaluate: no such stage in dvc.yaml",
    ]


def test_code_deps_follow_the_imports():
    train = set(code_deps("train"))
    # what the issue found missing: the HDF5 reader, the tokenizer, the prompt encoder, the image transform
    for module in ("training/recipe", "training/dataset", "training/observe", "data/hdf5_format", "data/tokenizer",
                   "data/prompts", "data/images", "model/llava", "training/launch", "config/__init__", "config/training"):  # fmt: skip
        assert f"llava_core/{module}.py" in train, module
    assert "llava_core/pipeline.py" not in train and "llava_core/cli.py" not in train  # the dispatch
    assert "llava_core/data/hdf5_writer.py" not in train and "llava_core/model/hf.py" not in train
    export = set(code_deps("export_hf"))
    assert {f"llava_core/{m}.py" for m in ("model/hf", "model/weights", "model/llava", "data/prompts")} <= export
    assert not any(p.startswith("llava_core/training/") for p in code_deps("download"))


@pytest.mark.parametrize(
    "stage_name, modules",
    [
        ("train", ["llava_core.training.launch", "llava_core.training.recipe"]),  # launcher + training process
        ("hdf5", ["llava_core.data.hdf5_writer", "llava_core.data.hdf5_examples"]),  # + the writer processes'
    ],
)
def test_code_deps_hold_every_module_python_loads(stage_name, modules):
    """An independent check of the static closure: every project module Python loads when the stage's modules
    are imported is a dependency (function-level imports make the static set larger, never smaller)."""
    probe = f"import json, sys; import {', '.join(modules)}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    loaded = {m.replace(".", "/") for m in json.loads(out) if m.split(".")[0] == "llava_core"}
    deps = {p.removesuffix(".py").removesuffix("/__init__") for p in code_deps(stage_name)}
    empty = {
        m for m in loaded if (PROJECT / m / "__init__.py").is_file() and not (PROJECT / m / "__init__.py").read_text()
    }
    assert loaded - deps == empty  # empty package markers run nothing and are left out


def test_a_new_dataset_gets_its_stages_and_an_outdated_entry_is_refused(tmp_path, monkeypatch, capsys):
    """Adding a dataset to params.yaml: the generated file gains its conversion and lists its jsonl in its phase's
    stages; a stage DVC starts (DVC_STAGE) with the old entry exits 2 naming the fix, and runs with the new one."""
    params = base_params(".")
    params["datasets"]["more_instruct"] = {**params["datasets"]["shapes_instruct"]}
    path = write_params(tmp_path, params)
    old = render(load_config(PROJECT / "params.yaml"))
    (tmp_path / "dvc.yaml").write_text(old)
    cfg = load_config(path)
    new = stages(cfg)
    assert new["convert_more_instruct"]["cmd"] == "llava-pipeline convert more_instruct"
    assert "data/jsonl/more_instruct.jsonl" in new["hdf5_phase2"]["deps"]
    assert "data/jsonl/more_instruct.jsonl" in new["validate_phase2"]["deps"]
    assert "datasets" in new["hdf5_phase2"]["params"]  # so `dvc status` shows the stage as changed
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "hdf5_phase2")
    assert main(["--params", str(path), "hdf5", "phase2"]) == 2
    err = capsys.readouterr().err
    assert "hdf5_phase2: misses the dependency data/jsonl/more_instruct.jsonl" in err
    assert "regenerate it with `make dvc.yaml` (`llava-pipeline dvc-yaml > dvc.yaml`)" in err
    # the download stage's entry did not change: it runs; and after regenerating, so would the others
    monkeypatch.setenv("DVC_STAGE", "download_synthetic_shapes")
    assert main(["--params", str(path), "download", "synthetic_shapes"]) == 0
    capsys.readouterr()
    assert main(["--params", str(path), "dvc-yaml"]) == 0
    (tmp_path / "dvc.yaml").write_text(capsys.readouterr().out)
    assert entry_problems(cfg, yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]) == []


def test_artifacts_metrics_and_plots(cfg):
    doc = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    assert doc["artifacts"]["llava-hf"]["path"] == "models/hf"
    assert doc["artifacts"]["llava-original"]["path"] == "models/llava"
    for artifact in doc["artifacts"].values():
        assert artifact["type"] == "model" and artifact["desc"] and "llava" in artifact["labels"]
    assert doc["metrics"] == ["reports/train/phase1/metrics.json", "reports/train/phase2/metrics.json"]
    loss = next(p["train_loss"] for p in doc["plots"] if "train_loss" in p)
    assert loss["y"] == {f"reports/train/{p}/plots/metrics/loss.tsv": "loss" for p in ("phase1", "phase2")}
    # the results DVC compares are kept in git (`cache: false`); the rest is cached
    train = doc["stages"]["train_phase1"]
    assert train["outs"] == ["checkpoints/phase1", {"reports/train/phase1": {"cache": False}}]
    assert doc["stages"]["evaluate"]["metrics"] == [{"reports/eval.json": {"cache": False}}]
