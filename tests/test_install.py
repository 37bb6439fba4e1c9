"""The install: locks that match pyproject and resolve on the index for Python 3.11-3.13, `make setup`'s choices
(accelerator, Python, where torch comes from), and the installed set-up running Dagster and DVC at full strength."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from scripts import locks, setup_env
from tests.helpers_unit import PROJECT

LOCKS = {name: PROJECT / f"requirements-{name}.lock" for name in ("cpu", "cuda", "dvc")}
PYPROJECT = tomllib.loads((PROJECT / "pyproject.toml").read_text())
# Packages the index has as an sdist only; each builds as pure Python (nothing to compile at install time).
SDIST_ONLY = {
    "deepspeed": "DeepSpeed publishes sdists only; without torch at build time (DS_BUILD_OPS=0) it builds no op",
    "antlr4-python3-runtime": "4.9.3 (hydra-core's pin, DVC tool environment) was never published as a wheel",
}


def pins(name: str) -> dict[str, str]:
    return {p.name: p.version for p in locks.read_lock(LOCKS[name])}


def direct(requirements: list[str]) -> dict[str, str]:
    """{name: version} of pyproject's `name==version` requirements (extras and markers left out)."""
    out = {}
    for req in requirements:
        name, version = req.split(";")[0].split("==")
        out[name.split("[")[0].strip().lower()] = version.strip()
    return out


# --- the locks and pyproject.toml --------------------------------------------------------------------------------
def test_every_lock_pins_what_pyproject_pins():
    """A pyproject.toml edited without `make lock` fails here (the lock would install something else)."""
    project = PYPROJECT["project"]
    main = direct(project["dependencies"]) | direct(project["optional-dependencies"]["dev"])
    expected = {
        "cpu": main | {"torch": main["torch"] + "+cpu"},
        "cuda": main | direct(project["optional-dependencies"]["cuda"]),
        "dvc": direct(PYPROJECT["dependency-groups"]["dvc"]),
    }
    for name, want in expected.items():
        have = pins(name)
        wrong = {k: (v, have.get(k)) for k, v in want.items() if have.get(k) != v}
        assert not wrong, f"requirements-{name}.lock disagrees with pyproject.toml (wanted, locked): {wrong}"


def test_the_cpu_lock_is_the_cuda_lock_with_the_cpu_torch():
    """Tests run the CPU tree; GPU users get the same versions of everything else."""
    cpu, cuda = pins("cpu"), pins("cuda")
    assert set(cpu) <= set(cuda), f"only in the cpu lock: {sorted(set(cpu) - set(cuda))}"
    differ = {k: (cpu[k], cuda[k]) for k in cpu if cpu[k] != cuda[k] and k != "torch"}
    assert not differ, f"shared packages at different versions (cpu, cuda): {differ}"
    assert cpu["torch"] == cuda["torch"] + "+cpu"
    only_cuda = set(cuda) - set(cpu)
    assert "deepspeed" in only_cuda and "triton" in only_cuda and any(k.startswith("nvidia-") for k in only_cuda)


def test_dagster_and_dvc_each_get_the_antlr4_runtime_they_need():
    """Dagster's selection grammar needs antlr4 4.13; DVC's hydra-core 1.3 pins 4.9: never both in one lock."""
    for name in ("cpu", "cuda"):
        main = pins(name)
        assert main["antlr4-python3-runtime"].startswith("4.13."), main["antlr4-python3-runtime"]
        assert "hydra-core" not in main and "omegaconf" not in main
        assert main["dvc"] == pins("dvc")["dvc"], "dvclive's dvc library and the dvc command are one release"
    tool = pins("dvc")
    assert tool["antlr4-python3-runtime"].startswith("4.9."), tool["antlr4-python3-runtime"]
    assert {"hydra-core", "dvc-s3", "gto"} <= set(tool) and "dagster" not in tool


# --- the locks against the package index ------------------------------------------------------------------------
def index_or_skip(url: str, why: str) -> None:
    reason = setup_env.unreachable(url)
    if reason is not None:
        pytest.skip(f"{why}: {url} cannot be reached ({reason})")


@pytest.mark.network
@pytest.mark.parametrize("python", locks.PYTHONS)
@pytest.mark.parametrize("name", ["cuda", "cpu", "dvc"])
def test_each_lock_resolves_on_the_index(name, python):
    """The lock, re-resolved by uv against the index alone (no /opt/wheels, no config) for this Python on Linux
    x86-64, gives exactly its own pins: complete, consistent, every file there, a wheel for each compiled package."""
    index = os.environ.get("UV_DEFAULT_INDEX") or os.environ.get("UV_INDEX_URL") or "https://pypi.org/simple"
    index_or_skip(f"{index.rstrip('/')}/pip/", "the package index")
    if name == "cpu":
        index_or_skip(f"{setup_env.TORCH_CPU_INDEX}/torch/", "the cpu lock's torch comes from the PyTorch CPU index")
    try:
        resolved = locks.resolve(LOCKS[name], python)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"requirements-{name}.lock does not resolve for Python {python}:\n{e.stderr}")
    got = {p["name"]: p["version"] for p in resolved["packages"]}
    want = locks.pins_for(locks.read_lock(LOCKS[name]), python)
    assert got == want, {k: (want.get(k), got.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
    sdists = {p["name"] for p in resolved["packages"] if locks.artifact(p)[0] == "sdist"}
    assert sdists <= set(SDIST_ONLY), (
        f"no wheel for Python {python}, would build from source: {sdists - set(SDIST_ONLY)}"
    )


# --- make setup's choices -----------------------------------------------------------------------------------------
def make_dry(tmp_path: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
    """`make -n setup` on a fresh virtualenv path: the commands it would run (the Makefile's choices), nothing run."""
    env = {**os.environ, "PATH": path if path is not None else os.environ["PATH"]}
    cmd = ["make", "-n", "--no-print-directory", "-C", str(PROJECT), "setup", f"VENV={tmp_path / 'venv'}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def fake_nvidia_smi(folder: Path, listing: str) -> str:
    """A PATH whose `nvidia-smi -L` prints `listing` (as on a GPU machine), then the usual PATH."""
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\nprintf '%s\\n' '{listing}'\n")
    tool.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_make_setup_chooses_the_accelerator_and_stamps_it_with_the_python(tmp_path):
    version = "{}.{}".format(*sys.version_info[:2])
    py = f"PY={sys.executable}"
    cuda = make_dry(tmp_path, "ACCEL=cuda", py)
    assert cuda.returncode == 0, cuda.stderr
    assert "--accel cuda" in cuda.stdout and f".installed-cuda-py{version}" in cuda.stdout
    gpu = fake_nvidia_smi(tmp_path / "gpu", "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)")
    assert "--accel cuda" in make_dry(tmp_path, "ACCEL=auto", py, path=gpu).stdout
    none = fake_nvidia_smi(tmp_path / "nogpu", "No devices found.")
    auto = make_dry(tmp_path, py, path=none)  # ACCEL=auto is the default
    assert "--accel cpu" in auto.stdout and f".installed-cpu-py{version}" in auto.stdout
    bad = make_dry(tmp_path, "ACCEL=gpu", py)
    assert bad.returncode != 0 and "ACCEL=gpu: choose cpu, cuda or auto" in bad.stderr


def test_make_setup_names_a_missing_interpreter(tmp_path):
    missing = make_dry(tmp_path, "PY=python3.99-not-here")
    assert "PY=python3.99-not-here: no such Python interpreter" in missing.stdout + missing.stderr


def test_setup_refuses_pythons_outside_3_11_to_3_13():
    for ok in setup_env.SUPPORTED:
        setup_env.check_python(ok, "python")
    for bad in ((3, 10), (3, 14)):
        with pytest.raises(setup_env.SetupError, match=rf"Python {bad[0]}\.{bad[1]} .*3\.11, 3\.12 and 3\.13"):
            setup_env.check_python(bad, "python")


def closed_port_url() -> str:
    """An http URL on loopback where nothing listens (a port just released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/whl/cpu"


def test_torch_comes_from_the_wheel_folder_the_index_or_a_clear_error(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    assert setup_env.local_torch_wheel(wheels, "2.13.0+cpu", "cp311", "x86_64")
    assert setup_env.local_torch_wheel(wheels, "2.13.0+cpu", "cp312", "x86_64") is None
    assert setup_env.local_torch_wheel(wheels, "2.13.0+cpu", "cp311", "aarch64") is None
    if setup_env.platform.machine() == "x86_64":
        assert setup_env.torch_source("cpu", "2.13.0+cpu", wheels, (3, 11)) == ["--find-links", str(wheels)]
    # The CUDA build never comes from a wheel folder (its +cpu torch satisfies `torch==2.13.0` too).
    assert setup_env.torch_source("cuda", "2.13.0", wheels, (3, 11)) == []
    index = closed_port_url()
    with pytest.raises(setup_env.SetupError) as err:
        setup_env.torch_source("cpu", "2.13.0+cpu", wheels, (3, 12), index=index)
    msg = str(err.value)
    for part in (index, "Python 3.12", "torch-2.13.0+cpu-cp312", "WHEELS=<folder>", "ACCEL=cuda", "refused"):
        assert part in msg, (part, msg)


def test_make_setup_without_the_torch_wheel_or_its_index_stops_before_changing_anything(tmp_path):
    """What a fresh machine without /opt/wheels and without download.pytorch.org sees: one message; a set-up
    already there (its stamp) is left as it was."""
    if setup_env.unreachable(f"{setup_env.TORCH_CPU_INDEX}/torch/") is None:
        pytest.skip(f"{setup_env.TORCH_CPU_INDEX} is reachable here: `make setup` would install from it")
    venv, empty = tmp_path / "venv", tmp_path / "no-wheels"
    empty.mkdir()
    venv.mkdir()
    (venv / ".installed-cuda-py3.11").touch()  # another set-up, working
    cmd = ["make", "-C", str(PROJECT), "setup", "ACCEL=cpu", f"PY={sys.executable}", f"VENV={venv}", f"WHEELS={empty}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0
    torch = pins("cpu")["torch"]
    assert f"installs torch {torch} from the PyTorch CPU index {setup_env.TORCH_CPU_INDEX}" in proc.stderr
    assert "No solution found" not in proc.stderr
    assert [p.name for p in venv.iterdir()] == [".installed-cuda-py3.11"]


def test_another_accelerator_replaces_torch():
    """`torch==2.13.0` (cuda lock) accepts an installed 2.13.0+cpu, so the sync is told to replace a torch of the
    other build; a torch of the lock's own build stays."""
    python = Path(sys.executable)
    installed = setup_env.installed_version(python, "torch")
    for name in ("cpu", "cuda"):
        cmd = setup_env.sync_main_command(python.parent / "uv", python, LOCKS[name], [])
        assert str(LOCKS[name]) in cmd
        assert ("--reinstall-package" in cmd) == (installed != pins(name)["torch"]), (name, installed, cmd)


@pytest.mark.network
def test_switching_a_cpu_setup_to_cuda_plans_the_cuda_torch_and_deepspeed():
    """uv's own plan (dry run: metadata only, nothing downloaded) for ACCEL=cuda over the cpu set-up."""
    python = Path(sys.executable)
    if setup_env.installed_version(python, "torch") != pins("cpu")["torch"]:
        pytest.skip("runs in an ACCEL=cpu set-up (this one has another torch)")
    index_or_skip("https://pypi.org/simple/pip/", "the package index")
    cmd = [*setup_env.sync_main_command(python.parent / "uv", python, LOCKS["cuda"], []), "--dry-run"]
    cmd.remove("-q")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=locks.uv_env())
    assert proc.returncode == 0, proc.stderr
    plan = proc.stdout + proc.stderr
    cuda = pins("cuda")
    for line in (f"- torch=={pins('cpu')['torch']}", f"+ torch=={cuda['torch']}", f"+ deepspeed=={cuda['deepspeed']}"):
        assert line in plan, (line, plan[-3000:])


# --- the installed set-up: both tools at full strength -------------------------------------------------------------
def test_dvc_and_gto_on_path_run_from_the_tool_environment(venv_env):
    from orchestration.dvc import dvc_executable

    bindir = Path(sys.executable).parent
    assert dvc_executable() == str(bindir / "dvc")
    for tool in setup_env.TOOLS:
        assert shutil.which(tool, path=venv_env["PATH"]) == str(bindir / tool)
        assert "/bin/" + tool in (bindir / tool).read_text(), f"{bindir / tool} is not the tool environment's shim"
    out = subprocess.run(["dvc", "--version"], env=venv_env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == pins("dvc")["dvc"]
    with pytest.raises(ModuleNotFoundError):
        import hydra  # noqa: F401  (DVC's hydra lives in the tool environment only)


def test_dagster_string_selections_from_the_cli_and_the_api(venv_env):
    """`dagster asset list --select` parses with Dagster's ANTLR grammar (the TypeError of antlr4 4.9 is gone)."""
    import dagster as dg

    from orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    raw = {k.to_user_string() for k in graph.get_all_asset_keys() if k.to_user_string().startswith("raw_")}
    assert raw and dg.AssetSelection.from_string("key:raw_*").resolve(graph) == {dg.AssetKey(k) for k in raw}
    cmd = ["dagster", "asset", "list", "--select", "key:raw_*", "-m", "orchestration.definitions"]
    proc = subprocess.run(cmd, cwd=PROJECT, env=venv_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(proc.stdout.split()) == raw


def test_dvc_exp_run_with_set_params_runs_the_stage_in_the_main_environment(tmp_path, venv_env):
    """`dvc exp run -S` parses its overrides with hydra (tool environment) and runs the stage command with the main
    environment's python first on PATH."""
    env = {**venv_env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    (tmp_path / "params.yaml").write_text("lr: 0.1\nname: a\n")
    stage = "import json, sys, yaml; p = yaml.safe_load(open('params.yaml')); "
    stage += "json.dump({'lr2': p['lr'] * 2, 'python': sys.executable}, open('m.json', 'w'))"
    (tmp_path / "dvc.yaml").write_text(
        json.dumps({"stages": {"s": {"cmd": f'python -c "{stage}"', "params": ["lr"], "metrics": ["m.json"]}}})
    )
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "s"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    run = subprocess.run(
        ["dvc", "exp", "run", "-S", "lr=0.25", "-S", "name=b"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert json.loads((tmp_path / "m.json").read_text()) == {"lr2": 0.5, "python": sys.executable}
    assert "name: b" in (tmp_path / "params.yaml").read_text()
