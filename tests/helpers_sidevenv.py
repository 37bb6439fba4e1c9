"""Side virtual environments holding other releases of the other side's packages (transformers 4.37 / 4.57), built
from the package index with uv and cached between runs, so a test can load our exports with their own code.

A side environment lives in `~/.cache/llava-pipeline/venvs/<name>-<key>` (`$XDG_CACHE_HOME` respected), the key
hashing the requirements, this Python and the torch source; it is built in a temporary folder and renamed into
place, so an interrupted build is never reused. torch is the main environment's CPU build, from the wheel folder
`$WHEELS` (default /opt/wheels) or else the PyTorch CPU index, as `make setup` finds it. A test is skipped, with the
reason, only when the index (or every torch source) cannot be reached; a failed install fails it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import setup_env

# LLaVA's own pins (pyproject of haotian-liu/LLaVA) are transformers 4.37.2, tokenizers 0.15.1 and accelerate
# 0.21.0 (its loader passes low_cpu_mem_usage=True, which needs accelerate); 4.57.1 is the last 4.x line, whose
# tokenizers pin is >=0.22,<=0.23.0
SIDE_ENVS: dict[str, tuple[str, ...]] = {
    "transformers-4.37": ("transformers==4.37.2", "tokenizers==0.15.1", "accelerate==0.21.0", "pillow", "jinja2"),
    "transformers-4.57": ("transformers==4.57.1", "tokenizers==0.22.1", "pillow", "jinja2"),
}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llava-pipeline" / "venvs"


def index_url() -> str:
    return (os.environ.get("UV_DEFAULT_INDEX") or os.environ.get("UV_INDEX_URL") or "https://pypi.org/simple").rstrip(
        "/"
    )


def torch_requirement() -> tuple[str, list[str]]:
    """(`torch==<main env's version>`, the uv options that find its CPU build); skips when none can be reached."""
    import torch

    version = torch.__version__  # e.g. 2.13.0+cpu, as the wheel is named
    wheels = Path(os.environ.get("WHEELS", "/opt/wheels"))
    try:
        source = setup_env.torch_source("cpu", version, wheels, sys.version_info[:2])
    except setup_env.SetupError as e:
        pytest.skip(f"no torch {version} CPU build for the side environment: {e}")
    return f"torch=={version}", source


def side_python(name: str) -> Path:
    """The Python of the side environment `name` (see SIDE_ENVS), built on first use."""
    uv = Path(sys.executable).parent / "uv"
    if not uv.exists():
        pytest.skip(f"no uv beside {sys.executable} (make setup installs it)")
    torch_req, torch_source = torch_requirement()
    requirements = [*SIDE_ENVS[name], torch_req]
    key = json.dumps([requirements, torch_source, sys.version_info[:2], index_url()])
    final = cache_root() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    python = final / "bin" / "python"
    if python.exists():
        return python
    reason = setup_env.unreachable(f"{index_url()}/transformers/")
    if reason is not None:
        pytest.skip(f"the package index {index_url()} cannot be reached ({reason}): no side environment {name}")
    tmp = final.with_name(f"{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    run = dict(capture_output=True, text=True)
    made = subprocess.run([str(uv), "venv", "-q", "--relocatable", "--python", sys.executable, str(tmp)], **run)
    if made.returncode == 0:
        install = [str(uv), "pip", "install", "-q", "--no-config", "--python", str(tmp / "bin" / "python")]
        made = subprocess.run([*install, *requirements, *torch_source], **run)
    if made.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(f"side environment {name} ({' '.join(requirements)}) did not install:\n{made.stderr}")
    (tmp / "requirements.txt").write_text("\n".join(requirements) + "\n")
    try:
        tmp.rename(final)
    except OSError:  # another run finished the same environment first
        shutil.rmtree(tmp, ignore_errors=True)
    return python


def run_side(python: Path, script: Path, *args: str, timeout: float = 600) -> str:
    """Run `script` with the side interpreter (no project code on its path); its stdout, or a failure naming both."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [str(python), str(script), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=script.parent
    )
    if proc.returncode != 0:
        pytest.fail(f"{script.name} {' '.join(args)} under {python}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
