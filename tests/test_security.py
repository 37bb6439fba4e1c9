"""Security: the Dagster webserver listens on loopback unless told otherwise; credentials come from the environment
(or DVC's machine-local config) and never reach a log, metadata or report; no pickle from a file the pipeline
did not write is loaded; archives cannot write outside their target.

Archive extraction is tried in tests/test_reliability_inputs.py (the `download` cases: absolute, drive-letter and
backslash members, FIFO and block devices, absolute hard links, damaged archives) and
tests/data/test_download_remote.py (absolute and `..` members, links out of the folder, character devices).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path
from unittest import mock

import pytest

from tests.helpers_reliability import SECRETS, find_secrets
from tests.helpers_unit import PROJECT

CODE = ("llava_core", "assets", "orchestration", "scripts", "benchmarks")


# --- the webserver ----------------------------------------------------------------------------------------------
def _make_dagster(*overrides: str) -> str:
    r = subprocess.run(["make", "-n", "dagster", *overrides], cwd=PROJECT, capture_output=True, text=True, check=True)
    return next(line for line in r.stdout.splitlines() if "dagster dev" in line)


def test_the_dagster_ui_listens_on_loopback_unless_told_otherwise():
    assert " dev -h 127.0.0.1 -p 3000" in _make_dagster()
    assert " dev -h 0.0.0.0 -p 3000" in _make_dagster("DAGSTER_HOST=0.0.0.0")  # told otherwise, on purpose
    from dagster_webserver.cli import DEFAULT_WEBSERVER_HOST

    assert DEFAULT_WEBSERVER_HOST == "127.0.0.1"  # a bare `dagster dev` (no -h) listens on loopback too
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        path = PROJECT / name
        if path.suffix in (".py", ".yaml", ".yml", ".toml", ".cfg") and name != "tests/test_security.py":
            assert "0.0.0.0" not in path.read_text(errors="replace"), f"{name} binds every interface"


# --- no pickle of files the pipeline did not write --------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(node.lineno, f"imports {n}") for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords}

        def const(key: str, kw=kw):
            return getattr(kw.get(key), "value", None)

        if name.endswith("torch.load") and const("weights_only") is not True:
            found.append((node.lineno, "torch.load without weights_only=True"))
        if name in ("np.load", "numpy.load") and const("allow_pickle") is True:
            found.append((node.lineno, "np.load(allow_pickle=True)"))
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            found.append((node.lineno, f"{name} (use yaml.safe_load)"))
        if name.endswith("read_pickle") or name in ("eval", "exec"):
            found.append((node.lineno, name))
        if const("trust_remote_code") is True:
            found.append((node.lineno, "trust_remote_code=True"))
    return found


def test_no_code_unpickles_or_evaluates_what_it_reads():
    found = []
    for folder in CODE:
        for path in sorted((PROJECT / folder).rglob("*.py")):
            found += [
                f"{path.relative_to(PROJECT)}:{n}: {what}" for n, what in _unsafe_calls(ast.parse(path.read_text()))
            ]
    assert found == []
    # the scan finds what it looks for
    bad = "import pickle\ntorch.load(f)\nnp.load(f, allow_pickle=True)\nyaml.load(s)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n"
    assert len(_unsafe_calls(ast.parse(bad))) == 5


class _Payload:
    """Unpickled, it would create `marker` (a pickle can call any importable function)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious_bin(path: Path, marker: Path, weights: dict) -> None:
    import torch

    torch.save({**weights, "payload": _Payload(marker)}, path)
    with open(path, "rb") as f:  # the file would run the payload if pickle-loaded
        assert b"touch" in f.read()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A training checkpoint and its two exports (HF, original LLaVA), tiny random weights."""
    from llava_core.data.tokenizer import load_tokenizer
    from llava_core.model.hf import export_hf
    from llava_core.model.original import export_llava
    from llava_core.params import load_config
    from tests.helpers_models import write_checkpoint
    from tests.helpers_unit import base_params, write_params

    root = tmp_path_factory.mktemp("exports")
    cfg = load_config(write_params(root, base_params(root)))
    write_checkpoint(cfg, load_tokenizer(cfg.resolve_file(cfg.model.tokenizer)))
    return export_hf(cfg).path, export_llava(cfg).path


def test_a_malicious_pickle_in_a_bin_checkpoint_is_never_run(exported, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from llava_core.model.hf import import_hf
    from llava_core.model.original import load_llava_original
    from llava_core.model.weights import load_weights

    hf, llava = (shutil.copytree(p, tmp_path / p.name) for p in exported)
    marker = tmp_path / "pwned"
    # original LLaVA layout: our loader reads pytorch_model*.bin (weights_only=True)
    text = llava / "text_model_llava"
    _malicious_bin(text / "pytorch_model.bin", marker, load_weights(text))
    for f in text.glob("model*"):  # the safetensors shards and their index
        f.unlink()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_llava_original(llava)
    # a Hugging Face folder: transformers reads the .bin (with weights_only) when no safetensors is there
    _malicious_bin(hf / "pytorch_model.bin", marker, load_file(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global|payload"):
        import_hf(hf, tmp_path / "imported")
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "imported").exists()


# --- credentials ------------------------------------------------------------------------------------------------
def test_dvc_credentials_go_to_the_machine_local_config_that_git_ignores(tmp_path, venv_env):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**venv_env, **SECRETS}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    r = subprocess.run(
        [
            sys.executable,
            str(PROJECT / "scripts/dvc_remote.py"),
            "s3://bucket/cache",
            "--endpoint",
            "http://127.0.0.1:9",
        ],
        cwd=repo,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert find_secrets(repo) == [  # the scan finds a secret where there is one: only the git-ignored config.local
        f"{repo}/.dvc/config.local: AWS_ACCESS_KEY_ID",
        f"{repo}/.dvc/config.local: AWS_SECRET_ACCESS_KEY",
    ]
    assert not any(v in r.stdout + r.stderr for v in SECRETS.values())
    ignored = subprocess.run(["git", "check-ignore", ".dvc/config.local"], cwd=repo, capture_output=True, text=True)
    assert ignored.returncode == 0
    status = subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=repo, capture_output=True, text=True)
    assert "config.local" not in status.stdout


@pytest.mark.e2e
def test_no_credential_reaches_a_log_metadata_or_report(faulted_pipeline, s3_endpoint):
    """Every stage ran (and was killed and run again) with fake credentials in its environment; then Dagster
    materialises the report (judge key from the environment) and the S3 upload (keys through `dg.EnvVar`) on a
    real instance kept in the workspace. No file the pipeline, DVC or Dagster wrote holds a secret."""
    import boto3
    import dagster as dg
    import yaml

    from llava_core.params import load_config
    from orchestration.definitions import build_assets
    from orchestration.resources import PipelineSettings, S3Resource

    fp = faulted_pipeline
    raw = yaml.safe_load(fp.params.read_text())
    bucket = f"models-{uuid.uuid4().hex[:10]}"
    raw["publish"] = {"bucket": bucket, "endpoint_url": s3_endpoint, "region": "us-east-1"}
    params = fp.params.with_name("params_publish.yaml")
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    with mock.patch.dict(os.environ, {**SECRETS, "AWS_DEFAULT_REGION": "us-east-1"}):
        boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        home = fp.root / "ws" / "dagster_home"
        home.mkdir()
        with dg.instance_for_test(temp_dir=str(home)) as instance:
            result = dg.materialize(
                build_assets(load_config(params)),
                selection=[dg.AssetKey("published_model"), dg.AssetKey("eval_report")],
                instance=instance,
                resources={
                    "settings": PipelineSettings(params_path=str(params)),
                    "s3": S3Resource(
                        endpoint_url=s3_endpoint,
                        region_name="us-east-1",
                        aws_access_key_id=dg.EnvVar("AWS_ACCESS_KEY_ID"),
                        aws_secret_access_key=dg.EnvVar("AWS_SECRET_ACCESS_KEY"),
                    ),
                },
            )
            assert result.success
            logs = [e.message or "" for e in instance.all_logs(result.run_id)]
        listed = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").list_objects_v2(Bucket=bucket)
    assert listed["KeyCount"] > 1  # the upload used the credentials
    assert fp.facts["evaluate-rerun"]["judge_saw_the_key"]
    assert {r["headers"]["Authorization"] for r in fp.judge.requests} == {f"Bearer {SECRETS['OPENAI_API_KEY']}"}

    written = fp.root
    assert (written / "ws" / "reports" / "eval.json").is_file() and list(home.rglob("*.db"))
    assert len([p for p in written.rglob("*") if p.is_file()]) > 200  # data, checkpoints, models, logs, Dagster
    assert find_secrets(written) == []
    assert not [line for line in logs if any(v in line for v in SECRETS.values())]
    report = json.loads((written / "ws" / "reports" / "eval.json").read_text())
    assert report["judge"]["model"] == fp.JUDGE_MODEL
