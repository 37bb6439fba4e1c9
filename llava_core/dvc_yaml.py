"""dvc.yaml, generated from the stage table and params.yaml: `llava-pipeline dvc-yaml > dvc.yaml` (`make dvc.yaml`).

Every (stage, key) of `pipeline.STAGES` becomes one stage, expanded (not `foreach`): a phase's stages read the
datasets of that phase only, which DVC's templating cannot select, and a stage's inputs differ per key. Its
dependencies are complete by construction:
- code: the project modules its runner in `pipeline.py` imports, followed through every import of every module
  reached (`code_deps`), plus the modules it runs in a process of its own (training's recipe);
- data: the other stages' outputs it reads (the image folders too: `data/raw/<source>`, one DVC hash however
  many images it holds), and what else it reads (the tokenizer folder, the accelerate config);
- params: the params.yaml keys it reads.
Outputs kept in git (`cache: false`) are the metrics, validation results and tracker folders `dvc exp show`,
`dvc metrics diff` and `dvc plots diff` compare. The exported models are `artifacts:` for the model registry.
This module writes text only: it imports no DVC.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

from llava_core import pipeline
from llava_core.artifacts import EVAL_PLOT, LIVE_METRICS, LIVE_PLOTS, LOSS_PLOT
from llava_core.code_deps import closure, function_imports, import_graph, module_level_imports, project_modules
from llava_core.config import PipelineConfig
from llava_core.phases import PHASE_NAMES

PACKAGE = "llava_core"
PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # code deps are named relative to it: llava_core/...
HEADER = """\
# Generated from the stage table (llava_core/pipeline.py), the code's imports and params.yaml: do not edit.
# After adding a source or a dataset, or changing which modules a stage imports: `make dvc.yaml`
# (`llava-pipeline dvc-yaml > dvc.yaml`). A stage run by DVC refuses to start while its entry here is out of date.
"""
# The exported models in the registry (DVC `artifacts:`, GTO versions and stages): stage -> name, description, label.
MODEL_ARTIFACTS = {
    "export_hf": ("llava-hf", "LLaVA-1.5 as a Hugging Face LlavaForConditionalGeneration folder", "huggingface"),
    "export_llava": ("llava-original", "LLaVA-1.5 in the original LLaVA repository layout", "llava-original"),
}
TRAIN_PLOTS = ("loss", "lr")  # one plot each over both phases (`dvc plots show`)


class StaleDvcYaml(ValueError):
    """dvc.yaml's entry for a stage is not what the stage table, the code and params.yaml give."""


# --- code dependencies ------------------------------------------------------------------------------------------
@cache
def _graph() -> tuple[list, frozenset[str], dict[str, Path]]:
    modules = project_modules(PACKAGE_PARENT, (PACKAGE,))
    return import_graph(PACKAGE_PARENT, (PACKAGE,)), frozenset(modules), modules


@cache
def code_deps(stage_name: str) -> tuple[str, ...]:
    """The source files a stage runs: what its runner imports (and `pipeline.py` at module level), transitively,
    and its own processes' modules. `pipeline.py` itself (the table and the dispatch) and the CLI are left out:
    they decide which function runs, not what it computes; so are empty package files (`__init__.py` markers
    run nothing: DVC warns about empty deps; one that gains code changes the generated file, which a test sees)."""
    edges, known, modules = _graph()
    s = pipeline.stage(stage_name)
    here = modules[pipeline.__name__]
    start = function_imports(here, pipeline.__name__, s.run.__name__, set(known))
    start |= module_level_imports(here, pipeline.__name__, set(known)) | set(s.code)
    reached = closure(start, edges, set(known)) - {pipeline.__name__}
    files = [modules[m] for m in reached if modules[m].stat().st_size > 0]
    return tuple(sorted(p.relative_to(PACKAGE_PARENT).as_posix() for p in files))


# --- the stages -------------------------------------------------------------------------------------------------
def _rel(cfg: PipelineConfig, path: Path) -> str | None:
    """A path as dvc.yaml names it: from the workspace root, or from the package's folder (a packaged resource);
    None for anything else (a folder outside the repository: naming it would tie dvc.lock to this machine)."""
    resolved = Path(path).resolve()
    for base in (cfg.root.resolve(), PACKAGE_PARENT):
        if resolved.is_relative_to(base):
            return resolved.relative_to(base).as_posix()
    return None


def stage_entry(cfg: PipelineConfig, s: pipeline.Stage, key: Any) -> dict:
    """One dvc.yaml stage: command, deps (data, other inputs, code), params, outs and metrics."""
    in_git = {_rel(cfg, p): kind for p, kind in s.in_git(cfg, key).items()}
    data = [_rel(cfg, p) for p in [*s.deps(cfg, key), *s.files(cfg, key)]]
    entry: dict[str, Any] = {"cmd": " ".join(["llava-pipeline", s.command, *([key] if key is not None else [])])}
    entry["deps"] = list(dict.fromkeys([d for d in data if d is not None] + list(code_deps(s.name))))
    if s.params(cfg, key):
        entry["params"] = s.params(cfg, key)
    outs = [_rel(cfg, p) for p in s.outs(cfg, key)]
    entry["outs"] = [o if o not in in_git else {o: {"cache": False}} for o in outs if in_git.get(o) != "metrics"]
    metrics = [{o: {"cache": False}} for o in outs if in_git.get(o) == "metrics"]
    if metrics:
        entry["metrics"] = metrics
    return entry


def stages(cfg: PipelineConfig) -> dict[str, dict]:
    return {s.dvc_name(k): stage_entry(cfg, s, k) for s, k in pipeline.steps(cfg)}


def document(cfg: PipelineConfig) -> dict:
    """The whole dvc.yaml: stages, the training metrics, pictures and curves of both phases, the model artifacts."""
    live = {p: _rel(cfg, cfg.train_report_dir(p)) for p in PHASE_NAMES}
    # the pictures the stages draw (`dvc plots show` hands them out as images), then the curves of both phases
    pictures = [_rel(cfg, cfg.checkpoint_dir(p) / LOSS_PLOT) for p in PHASE_NAMES] + [
        _rel(cfg, cfg.report_file(EVAL_PLOT))
    ]
    plots = pictures + [
        {
            f"train_{m}": {
                "template": "linear",
                "x": "step",
                "y": {f"{d}/{LIVE_PLOTS}/{m}.tsv": m for d in live.values()},
            }
        }
        for m in TRAIN_PLOTS
    ]
    artifacts = {}
    for stage_name, (name, desc, label) in MODEL_ARTIFACTS.items():
        path = _rel(cfg, pipeline.stage(stage_name).outs(cfg, None)[0])
        labels = ["llava", "vision-language", label, f"preset-{cfg.preset}"]
        artifacts[name] = {"path": path, "type": "model", "desc": desc, "labels": labels}
    return {
        "stages": stages(cfg),
        "metrics": [f"{d}/{LIVE_METRICS}" for d in live.values()],
        "plots": plots,
        "artifacts": artifacts,
    }


def render(cfg: PipelineConfig) -> str:
    return HEADER + yaml.safe_dump(document(cfg), sort_keys=False, width=120)


# --- checks -----------------------------------------------------------------------------------------------------
def _deps(entry: dict) -> set[str]:
    return {d if isinstance(d, str) else next(iter(d)) for d in entry.get("deps", [])}


def entry_problems(cfg: PipelineConfig, found: dict, names: list[str] | None = None) -> list[str]:
    """What dvc.yaml's stages (`found`: its parsed `stages`) lack or hold beyond the generated ones, each named:
    a missing stage, a missing dependency (first: the reason to check), or any other difference."""
    problems = []
    for name, want in stages(cfg).items():
        if names is not None and name not in names:
            continue
        have = found.get(name)
        if have is None:
            problems.append(f"{name}: no such stage in dvc.yaml")
            continue
        problems += [f"{name}: misses the dependency {d}" for d in sorted(_deps(want) - _deps(have))]
        problems += [f"{name}: lists {d}, which it no longer reads" for d in sorted(_deps(have) - _deps(want))]
        for field in ("cmd", "params", "outs", "metrics"):
            if have.get(field) != want.get(field):
                problems.append(f"{name}: {field} is {have.get(field)!r}, generated {want.get(field)!r}")
    return problems


def check_stage(cfg: PipelineConfig, dvc_yaml: Path, name: str) -> None:
    """Raise `StaleDvcYaml` when dvc.yaml's entry of a generated stage `name` is out of date (a stage DVC is about
    to run: a new dataset, a changed import); stages the table does not generate are not checked."""
    if name not in stages(cfg) or not Path(dvc_yaml).is_file():
        return
    found = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {})
    problems = entry_problems(cfg, found, [name])
    if problems:
        raise StaleDvcYaml(
            f"{dvc_yaml} is out of date for this stage ({'; '.join(problems)}): regenerate it with "
            "`make dvc.yaml` (`llava-pipeline dvc-yaml > dvc.yaml`), then run `dvc repro` again"
        )
