"""`make gpu-check` runs where only torch, transformers, accelerate, h5py, peft and safetensors are installed: its CPU
smoke mode runs in processes where every other installed distribution (pydantic, Dagster, DVC, Pillow, ...) cannot
be imported, as if absent, and writes its figures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import distributions, packages_distributions, requires

import pytest

from tests.helpers_unit import PROJECT

GPU_MACHINE = ("torch", "transformers", "accelerate", "h5py", "peft", "safetensors")
# transformers brings pydantic (through typer); the check must not rely on it all the same (the pipeline's schema)
ALSO_BLOCKED = ("pydantic", "pydantic_core")


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def closure(roots: tuple[str, ...]) -> set[str]:
    """The distributions `roots` need, transitively (their required dependencies, no extras)."""
    seen, todo = set(), [r.lower() for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = requires(name) or []
        except Exception:  # a dependency for another platform, not installed here
            continue
        todo += [_name(r) for r in reqs if "extra ==" not in r]
    return seen


def blocked_modules() -> list[str]:
    """Top-level modules of installed distributions outside the GPU machine's packages and their dependencies."""
    allowed = closure(GPU_MACHINE)
    names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in distributions()}
    assert set(GPU_MACHINE) <= names
    blocked = []
    for module, dists in packages_distributions().items():
        if module in ("llava_core", "benchmarks", "tests") or module.startswith("_"):
            continue
        if not any(d.lower().replace("_", "-") in allowed for d in dists):
            blocked.append(module)
    return sorted(set(blocked) | set(ALSO_BLOCKED))


def test_the_block_list_holds_what_the_gpu_machine_lacks():
    blocked = set(blocked_modules())
    assert {"pydantic", "dagster", "dagster_pipes", "dvc", "great_expectations", "PIL", "boto3", "pandas"} <= blocked
    assert not {"torch", "transformers", "accelerate", "h5py", "peft", "safetensors", "numpy", "yaml"} & blocked


@pytest.mark.e2e
def test_gpu_check_smoke_runs_without_the_pipelines_other_dependencies(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    # every Python process of the run (the accelerate launches too) starts with these modules marked absent:
    # `import` raises ModuleNotFoundError and importlib.util.find_spec answers None, as for an uninstalled package
    (site / "sitecustomize.py").write_text(
        f"import sys\nfor _m in {blocked_modules()!r}:\n    sys.modules[_m] = None\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(PROJECT)])}
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(out)],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    probe = subprocess.run([sys.executable, "-c", "import pydantic"], env=env, capture_output=True, text=True)
    assert "ModuleNotFoundError" in probe.stderr  # the block was in force
    result = json.loads(out.read_text())
    assert result["smoke"] and [(r["engine"], r["phase"]) for r in result["runs"]] == [
        ("single", "phase1"),
        ("single", "phase2"),
    ]
    for r in result["runs"]:
        assert r["tokens_per_s"] > 0 and r["plan_gib"] > 0 and len(r["losses"]) == 2
    p1, p2 = result["runs"]
    assert p1["trainable_parameters"] < p2["trainable_parameters"] == p2["total_parameters"] - _vision(p2)
    ev = result["export_and_evaluation"]
    assert ev["hf_parameters"] == p2["total_parameters"]  # the export holds exactly the trained weights
    assert ev["logits_max_abs_diff"] < 1e-4 and ev["first_token_exact_match"] == 1.0


def _vision(run: dict) -> int:
    from benchmarks.gpu_bench import TINY_VISION
    from llava_core.training.memory import clip_inventory

    return sum(c for _, c in clip_inventory(TINY_VISION))
