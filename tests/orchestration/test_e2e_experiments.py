"""Experiments and the model registry on the recorded small workspace (tests/orchestration/conftest.py):

- the results DVC compares are in git; `dvc exp run -S` of an eval-only param runs the evaluation only;
  `dvc exp show`, `dvc metrics diff` and `dvc plots diff` compare; a queued sweep of two (an eval param, a
  training param on tiny data) runs with `dvc queue start`, each re-running only what its param reaches;
- the Dagster asset `registered_model` registers the evaluated model (a GTO version and stage) when the
  `registry` section allows it; `gto assign` promotes it; a fresh clone with the S3 remote (moto on loopback)
  gets that version with `dvc artifacts get`, byte for byte.
"""

from __future__ import annotations

import json
import time
import uuid

import boto3
import dagster as dg
import pytest
import yaml

from llava_core.params import load_config
from orchestration.definitions import build_assets
from orchestration.resources import PipelineSettings
from tests.conftest import GIT_IDENTITY, PROJECT
from tests.orchestration.conftest import run

pytestmark = pytest.mark.e2e

STAGE_LINE = "Running stage '"


def stages_run(output: str) -> set[str]:
    """The stages `dvc repro` / `dvc exp run` ran, from its output."""
    return {line.split(STAGE_LINE, 1)[1].split("'", 1)[0] for line in output.splitlines() if STAGE_LINE in line}


def experiments(repo, env) -> dict[str, dict]:
    """`dvc exp show --json`: name -> {params, metrics, state} of the baseline's experiments (and `baseline`)."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    base = next(row for row in shown if row["rev"] != "workspace")

    def view(data: dict) -> dict:
        metrics = {path: m.get("data") for path, m in data["metrics"].items()}
        return {"params": data["params"]["params.yaml"]["data"], "metrics": metrics}

    out = {"baseline": view(base["data"])}
    for exp in base.get("experiments") or []:
        rev = exp["revs"][0]
        out[exp["name"]] = {**view(rev["data"]), "state": exp["executor"]["state"] if exp["executor"] else "done"}
    return out


@pytest.fixture(scope="module")
def baseline(recorded):
    """The recorded workspace committed: dvc.lock and the results kept in git."""
    repo, env = recorded
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "Baseline: the small pipeline"], repo, env)
    return repo, env


def test_the_compared_results_are_in_git(baseline):
    repo, env = baseline
    tracked = set(run(["git", "ls-files"], repo, env).split())
    for path in ("dvc.lock", "reports/eval.json", "reports/train/phase1/metrics.json",
                 "reports/train/phase2/plots/metrics/loss.tsv", "data/jsonl/shapes_pretrain.report.json",
                 "data/hdf5/phase1.validation.json"):  # fmt: skip
        assert path in tracked, path
    assert not any(p.startswith(("checkpoints/", "models/", "data/raw/")) for p in tracked)  # DVC's, not git's
    assert run(["git", "status", "--porcelain"], repo, env) == ""  # nothing a run leaves is untracked


def test_experiments_compare_and_a_queued_sweep_runs(baseline):
    repo, env = baseline
    # a queued sweep: an eval param, and a training param on tiny data (phase 2 only: phase 1 is untouched);
    # queued first, so each starts from the baseline (a queued run takes the workspace's params as they are)
    run(["dvc", "exp", "run", "--queue", "-n", "answers-2", "-S", "eval.max_new_tokens=2"], repo, env)
    run(["dvc", "exp", "run", "--queue", "-n", "epochs-2", "-S", "train.phase2.epochs=2"], repo, env)
    out = run(["dvc", "exp", "run", "-n", "short-answers", "-S", "eval.max_new_tokens=4"], repo, env)
    assert stages_run(out) == {"evaluate"}
    run(["dvc", "queue", "start", "-j", "1"], repo, env)
    deadline = time.monotonic() + 3600  # generous: a loaded machine is slow, never a failure by itself
    while "Queued" in (status := run(["dvc", "queue", "status"], repo, env)) or "Running" in status:
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert status.count("Success") == 2, status
    assert stages_run(run(["dvc", "queue", "logs", "answers-2"], repo, env)) == {"evaluate"}
    assert stages_run(run(["dvc", "queue", "logs", "epochs-2"], repo, env)) == {
        "train_phase2", "export_hf", "export_llava", "evaluate"}  # fmt: skip

    exps = experiments(repo, env)
    names = ("baseline", "short-answers", "answers-2", "epochs-2")
    assert set(names) <= set(exps)
    assert [exps[n]["params"]["eval"]["max_new_tokens"] for n in names] == [8, 4, 2, 8]
    assert [exps[n]["params"]["train"]["phase2"]["epochs"] for n in names] == [1, 1, 1, 2]
    phase1 = exps["baseline"]["metrics"]["reports/train/phase1/metrics.json"]
    for name in names:  # every metrics file read, none an error
        metrics = exps[name]["metrics"]
        assert 0.0 <= metrics["reports/eval.json"]["overall_accuracy"] <= 1.0, name
        assert metrics["reports/train/phase1/metrics.json"] == phase1, name
    phase2 = {n: exps[n]["metrics"]["reports/train/phase2/metrics.json"] for n in ("baseline", "epochs-2")}
    assert (phase2["baseline"]["step"], phase2["epochs-2"]["step"]) == (2, 4)  # 20 records, batches of 16

    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD", "epochs-2", "--json"], repo, env))
    assert diff["reports/train/phase2/metrics.json"]["step"] == {"old": 2, "new": 4, "diff": 2}
    plots = json.loads(run(["dvc", "plots", "diff", "HEAD", "epochs-2", "--json"], repo, env))["data"]
    curves: dict = {}
    for v in plots["train_loss"][0]["content"]["data"]["values"]:
        curves.setdefault((v["rev"], v["filename"].split("/")[0]), []).append((int(v["step"]), float(v["loss"])))
    assert [s for s, _ in curves[("HEAD", "phase2")]] == [1, 2]
    assert [s for s, _ in curves[("epochs-2", "phase2")]] == [1, 2, 3, 4]
    assert curves[("epochs-2", "phase2")][-1][1] == pytest.approx(phase2["epochs-2"]["loss"])
    assert curves[("HEAD", "phase1")] == curves[("epochs-2", "phase1")]
    table = run(["dvc", "exp", "show", "--md", "--only-changed"], repo, env)
    assert "eval.max_new_tokens" in table and "short-answers" in table and "epochs-2" in table


def test_registering_promoting_and_getting_a_model(baseline, s3_endpoint, aws_env, monkeypatch, tmp_path):
    repo, env = baseline
    # the workspace holds the last experiment's results: back to the baseline's (git's files, then DVC's)
    run(["git", "checkout", "-q", "--", "."], repo, env)
    run(["dvc", "checkout", "-q", "--force"], repo, env)
    env = {**env, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    bucket = f"registry-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    run(["python", str(PROJECT / "scripts/dvc_remote.py"), f"s3://{bucket}/cache", "--endpoint", s3_endpoint,
         "--region", "us-east-1", "--root", str(repo)], repo, env)  # fmt: skip
    run(["git", "commit", "-q", "-m", "The S3 remote", "--", ".dvc/config"], repo, env)
    # revisions from before the remote was committed stay readable (config.local holds the URL too)
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD~1", "HEAD", "--all", "--json"], repo, env))
    assert diff["reports/eval.json"]["overall_accuracy"]["diff"] == 0

    # the Dagster asset, after a successful evaluation, when params.yaml has a `registry` section
    params = repo / "params.yaml"
    for name, value in GIT_IDENTITY.items():  # the registering commit is made in this process
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", env["PATH"])

    def materialize(registry: dict) -> dict:
        p = yaml.safe_load(params.read_text())
        p["registry"] = registry
        params.write_text(yaml.safe_dump(p, sort_keys=False))
        cfg = load_config(params)
        with dg.instance_for_test() as instance:
            result = dg.materialize(
                build_assets(cfg),
                selection=["registered_model"],
                instance=instance,
                resources={"settings": PipelineSettings(params_path=str(params))},
            )
            assert result.success
            (event,) = result.get_asset_materialization_events()
            return {k: v.value for k, v in event.materialization.metadata.items()}

    refused = materialize({"artifact": "llava-hf", "stage": "dev", "min_accuracy": 0.99})
    assert refused["registered"] is False and "below registry.min_accuracy 0.99" in refused["outcome"]
    assert run(["git", "tag"], repo, env) == ""
    done = materialize({"artifact": "llava-hf", "stage": "dev", "bump": "minor"})
    assert done["registered"] is True and done["version"] == "v0.1.0" and done["stage"] == "dev"
    assert set(run(["git", "tag"], repo, env).split()) == {"llava-hf@v0.1.0", "llava-hf#dev#1"}
    assert done["commit"] == run(["git", "rev-parse", "HEAD"], repo, env).strip()
    assert run(["git", "show", "--format=%s", "-s", "HEAD"], repo, env).startswith("Register llava-hf")
    assert "up to date" in run(["dvc", "status"], repo, env)

    # promotion and the registry's state, from the command line
    run(["gto", "assign", "llava-hf", "--version", "v0.1.0", "--stage", "prod"], repo, env)
    shown = json.loads(run(["gto", "show", "--json"], repo, env))
    assert shown["llava-hf"]["version"] == "v0.1.0" and shown["llava-hf"]["stage"]["prod"] == "v0.1.0"
    listing = run(["gto", "show"], repo, env)
    assert "llava-hf" in listing and "v0.1.0" in listing and "prod" in listing
    run(["dvc", "push", "export_hf"], repo, env)

    # a fresh clone: the remote's endpoint and credentials set up as a user does (make dvc-remote), then the
    # version in stage prod from the remote
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    run(["python", str(PROJECT / "scripts/dvc_remote.py"), f"s3://{bucket}/cache", "--endpoint", s3_endpoint,
         "--region", "us-east-1", "--root", str(clone)], clone, env)  # fmt: skip
    run(["dvc", "artifacts", "get", ".", "llava-hf", "--stage", "prod", "-o", str(tmp_path / "got")], clone, env)
    ours = {p.relative_to(repo / "models/hf"): p.read_bytes() for p in (repo / "models/hf").rglob("*") if p.is_file()}
    got = {p.relative_to(tmp_path / "got"): p.read_bytes() for p in (tmp_path / "got").rglob("*") if p.is_file()}
    assert got == ours and len(got) > 5
