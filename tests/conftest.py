"""Shared fixtures: params files for temporary workspaces, built from the project's own params.yaml."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest

from tests.helpers_unit import PROJECT, base_params, write_params  # noqa: F401  (PROJECT re-exported)

FAST_TRAIN = {
    "phase1": {"epochs": 1, "global_batch_size": 16, "micro_batch_size": 16},
    "phase2": {"epochs": 1, "global_batch_size": 16, "micro_batch_size": 16},
}
E2E_SOURCE = {"num_pretrain": 64, "num_instruct": 64, "num_eval_images": 4}
# Who commits in the temporary git repositories (a fresh CI machine has no git identity of its own).
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "llava-pipeline tests",
    "GIT_AUTHOR_EMAIL": "tests@llava-pipeline.invalid",
    "GIT_COMMITTER_NAME": "llava-pipeline tests",
    "GIT_COMMITTER_EMAIL": "tests@llava-pipeline.invalid",
}


def e2e_params(folder: Path, root: str | None = None, small: bool = True) -> Path:
    """params.yaml in `folder` for an end-to-end run: small data and one short epoch, or the full default."""
    params = base_params(root if root is not None else folder, small=False, **(E2E_SOURCE if small else {}))
    if small:
        for phase, values in FAST_TRAIN.items():
            params["train"][phase].update(values)
    return write_params(folder, params)


def dvc_project(repo: Path, env: dict, **sources) -> Path:
    """A fresh git + DVC repository holding the project's stages (code, dvc.yaml generated for its params,
    .dvcignore, .gitignore) and a params.yaml of a few dozen records and one short epoch, every path in it
    relative (two copies at different paths then agree on dvc.lock); returns the params file. `sources`: more
    sources (name -> dataset it feeds instead of synthetic_shapes), each a copy of the small generated one."""
    import shutil
    import subprocess

    repo.mkdir(parents=True)
    for name in ("llava_core", "configs"):
        shutil.copytree(PROJECT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".dvcignore", ".gitignore"):
        shutil.copy(PROJECT / name, repo / name)
    params = base_params(".", small=True)
    for phase, values in FAST_TRAIN.items():
        params["train"][phase].update(values, accelerate_config="configs/accelerate/cpu.yaml")
    for name, dataset in sources.items():
        params["sources"][name] = copy.deepcopy(params["sources"]["synthetic_shapes"])
        params["datasets"][dataset]["source"] = name
    path = write_params(repo, params)
    write_dvc_yaml(path, env)
    env = {**env, **GIT_IDENTITY}
    # a first commit, as any clone has: DVC experiments need one, and so does DVCLive in the training process
    commit = ["git", "commit", "-q", "-m", "The project's stages and small params"]
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], commit):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    return path


def write_dvc_yaml(params: Path, env: dict) -> None:
    """dvc.yaml beside `params`, generated for it (`llava-pipeline dvc-yaml`)."""
    import subprocess

    dvc_yaml = subprocess.run(
        ["llava-pipeline", "--params", str(params), "dvc-yaml"], env=env, check=True, capture_output=True, text=True
    )
    (params.parent / "dvc.yaml").write_text(dvc_yaml.stdout)


@pytest.fixture
def small_params(tmp_path: Path) -> Path:
    """A tiny-preset workspace with a few dozen records: every stage runs in seconds."""
    return e2e_params(tmp_path)


def project_env() -> dict:
    """Environment in which the project's console scripts (llava-pipeline, dvc, gto) are on PATH and git commits."""
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, **GIT_IDENTITY, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}


@pytest.fixture
def venv_env() -> dict:
    """Environment in which the project's console scripts (llava-pipeline, dvc) are on PATH."""
    return project_env()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on loopback (moto in server mode) for the whole test session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    """Dummy credentials for the loopback endpoint; nothing from the developer's own AWS setup."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture(scope="session")
def faulted_pipeline(tmp_path_factory):
    """The small pipeline with every stage SIGKILLed once and run again, fake credentials in its environment
    (tests/helpers_reliability.py: FaultedPipeline); shared by the fault and the secret-scan tests."""
    from tests.helpers_reliability import FaultedPipeline

    with FaultedPipeline(tmp_path_factory.mktemp("faulted")) as pipeline:
        pipeline.run()
        yield pipeline


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`make demo` (`python -m orchestration run`) on a small DVC workspace with its own DAGSTER_HOME
    (tests/orchestration/helpers_demo.py). Shared: the UI test reads what it left; the retrain test changes a source
    and retrains what changed (each test asserts on the instance's latest state, not on the demo's run alone)."""
    from tests.orchestration.helpers_demo import Demo

    demo = Demo.create(tmp_path_factory.mktemp("demo"))
    demo.run()
    return demo


# --- launches (tests/helpers_launch.py): built data and the SLURM cluster, one each per session -------------------
@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """A workspace whose small source is converted and packed for both phases (tests train from it)."""
    from tests.helpers_launch import build_data

    return build_data(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-machine SLURM cluster on loopback (scripts/slurm_cluster.py); skipped, with the reason, where it
    cannot start (not root, Debian packages absent)."""
    from tests.helpers_launch import SlurmCluster, slurm_unavailable

    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    if cluster.returncode != 0:
        pytest.fail(f"the SLURM cluster did not start: {cluster.error}")
    yield cluster
    cluster.down()
