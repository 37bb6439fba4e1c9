"""The stage table: every stage once, with what it repeats over, its command, its Dagster asset, its DVC stage,
its inputs and its outputs. The CLI, the Dagster assets and `dvc.yaml` all read it (a test checks dvc.yaml).

Each stage's `run(cfg, key)` calls the stage's one function (`sources.download`, `convert.convert`,
`hdf5_writer.build_hdf5`, `validate.validate_phase`, `launch.train`, `hf.export_hf`, `original.export_llava`,
`evaluate.evaluate`) holding its output's lock (`stage_guard.run_guarded`, as the Dagster assets do) and returns
a JSON-ready summary. Stage modules are imported
inside the runners: `dvc repro` starts one process per stage, and the data stages should not pay for
importing torch and transformers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_core.artifacts import ANSWERS
from llava_core.config import PipelineConfig
from llava_core.phases import FINAL_PHASE, PHASE_NAMES, choose, get_phase
from llava_core.stage_guard import run_guarded


def plain(result: Any) -> dict:
    return {k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in dataclasses.asdict(result).items()}


# --- runners: the stage functions, called with (cfg, key) ------------------------------------------------------


def run_download(cfg: PipelineConfig, source: str, refetch: bool = False) -> dict:
    from llava_core.data.sources import download

    return plain(run_guarded(stage("download"), cfg, source, download, refetch=refetch))


def run_convert(cfg: PipelineConfig, dataset: str) -> dict:
    from llava_core.data.convert import convert

    return plain(run_guarded(stage("convert"), cfg, dataset, convert))


def run_hdf5(cfg: PipelineConfig, phase: str) -> dict:
    from llava_core.data.hdf5_writer import build_hdf5

    return plain(run_guarded(stage("hdf5"), cfg, phase, build_hdf5))


def run_validate(cfg: PipelineConfig, phase: str) -> dict:
    """The data gate: both suites on the built phase; raises `ValidationFailed` (its summary) on failure."""
    from llava_core.data.validate import ValidationFailed, validate_phase

    r = run_guarded(stage("validate"), cfg, phase, validate_phase)
    if not r.success:
        raise ValidationFailed(r.summary())
    return {"phase": phase, "path": str(r.path), "success": True, "summary": r.summary()}


def run_train(cfg: PipelineConfig, phase: str, num_processes: int | None = None, machines: Any = None) -> dict:
    """Here (`accelerate launch`), or as a SLURM job that this waits for (`launcher: slurm`); no torch here."""
    if cfg.train[phase].launcher == "slurm":
        from llava_core.training.slurm import run_job

        return plain(run_guarded(stage("train"), cfg, phase, run_job))
    from llava_core.training.launch import preflight, train

    preflight(cfg, phase, num_processes, machines)  # a launch this machine cannot run writes nothing, not even a lock
    launch = {"num_processes": num_processes, "machines": machines, "checked": True}
    if machines is not None and (machines.machine_rank or 0) > 0:
        # a further machine of a multi-machine launch joins the run the main machine (rank 0) holds the output's
        # lock for: on a shared file system, waiting for that lock would hold back the run it belongs to
        return plain(train(cfg, phase, **launch))
    return plain(run_guarded(stage("train"), cfg, phase, train, **launch))


def run_export(cfg: PipelineConfig, _key: None = None) -> dict:
    from llava_core.model.hf import export_hf

    return plain(run_guarded(stage("export_hf"), cfg, None, export_hf))


def run_export_llava(cfg: PipelineConfig, _key: None = None) -> dict:
    from llava_core.model.original import export_llava

    return plain(run_guarded(stage("export_llava"), cfg, None, export_llava))


def run_evaluate(cfg: PipelineConfig, _key: None = None) -> dict:
    from llava_core.evaluation.evaluate import evaluate

    return run_guarded(stage("evaluate"), cfg, None, evaluate).report


# --- the table -------------------------------------------------------------------------------------------------

Paths = Callable[[PipelineConfig, Any], list[Path]]
NO_PATHS: Paths = lambda c, k: []  # noqa: E731


def _eval_source_dir(cfg: PipelineConfig) -> list[Path]:
    """The raw folder that holds the evaluation questions, when a configured source provides it."""
    source = cfg.eval.questions.split("/")[0]
    return [cfg.raw_dir(source)] if source in cfg.sources else []


@dataclass(frozen=True)
class Stage:
    """One stage of the chain. `over` is what it repeats for ("source", "dataset", "phase" or None)."""

    name: str
    over: str | None
    command: str  # `llava-pipeline <command> [<key>]`
    help: str
    run: Callable[..., Any]
    asset: str | None  # the Dagster asset it materialises ("{key}" filled in); None: an asset check
    dvc: str  # its dvc.yaml stage name ("{key}" filled in)
    outs: Paths  # outputs, the primary one (the asset's data version) first
    deps: Paths  # the outputs of other stages it reads
    checks: str | None = None  # a gate: the stage whose asset it checks (a Dagster asset check, no asset)
    # the params.yaml keys it reads: dvc.yaml's `params:` and the settings of its run's fingerprint (stage_guard)
    params: Callable[[PipelineConfig, Any], list[str]] = lambda c, k: []
    files: Paths = NO_PATHS  # what else it reads: config files, a local tokenizer or model folder
    in_git: Callable[[PipelineConfig, Any], dict[Path, str]] = lambda c, k: {}  # outs kept in git: metrics|outs
    code: tuple[str, ...] = ()  # modules it runs in a process of its own (not imported by its runner)

    def keys(self, cfg: PipelineConfig) -> list:
        return keys_of(cfg, self.over)

    def check_key(self, cfg: PipelineConfig, key: Any) -> Any:
        """`key` when the stage has it (`UnknownName` naming the valid ones otherwise)."""
        if self.over is None:
            return None
        return choose(self.over, key, self.keys(cfg))

    def asset_name(self, key: Any) -> str | None:
        return None if self.asset is None else self.asset.format(key=key)

    def dvc_name(self, key: Any) -> str:
        return self.dvc.format(key=key)


def keys_of(cfg: PipelineConfig, over: str | None) -> list:
    return {None: [None], "source": list(cfg.sources), "dataset": list(cfg.datasets), "phase": list(PHASE_NAMES)}[over]


def _image_dirs(cfg: PipelineConfig, phase: str) -> list[Path]:
    """The source folders of the phase's datasets: the images its records point at (one DVC hash per folder,
    however many images it holds)."""
    return list(dict.fromkeys(cfg.raw_dir(cfg.datasets[d].source) for d in cfg.datasets_for(phase)))


def _phase_data(cfg: PipelineConfig, phase: str) -> list[Path]:
    return [*(cfg.jsonl_path(d) for d in cfg.datasets_for(phase)), *_image_dirs(cfg, phase)]


def _train_deps(cfg: PipelineConfig, phase: str) -> list[Path]:
    prev = get_phase(phase).previous
    deps = [cfg.hdf5_dir(phase), cfg.validation_path(phase)]
    return deps + ([cfg.checkpoint_dir(prev)] if prev else []) + _image_dirs(cfg, phase)


def _local(cfg: PipelineConfig, names: list[str | None]) -> list[Path]:
    """The folders or files among `names` (config values) that exist on this machine (not hub ids)."""
    found = [Path(cfg.resolve_file(n)) for n in names if n]
    return [p for p in found if p.exists()]


def _model_files(cfg: PipelineConfig, _key: Any = None) -> list[Path]:
    m = cfg.model
    return _local(cfg, [m.tokenizer, m.vision_pretrained, m.text_pretrained])


MODEL_PARAMS = ["preset", "seed", "model"]

STAGES: tuple[Stage, ...] = (
    Stage(
        "download", "source", "download", "stage 1: fetch a source into data/raw/<source>", run_download,
        "raw_{key}", "download_{key}",
        outs=lambda c, k: [c.raw_dir(k)],
        deps=NO_PATHS,
        params=lambda c, k: [f"sources.{k}"],
    ),
    Stage(
        "convert", "dataset", "convert", "stage 2: a source file -> data/jsonl/<dataset>.jsonl", run_convert,
        "jsonl_{key}", "convert_{key}",
        outs=lambda c, k: [c.jsonl_path(k), c.convert_report(k)],
        deps=lambda c, k: [c.raw_dir(c.datasets[k].source)],
        params=lambda c, k: [f"datasets.{k}", "seed"],
        in_git=lambda c, k: {c.convert_report(k): "metrics"},
    ),
    Stage(
        "hdf5", "phase", "hdf5", "stage 3: jsonl -> data/hdf5/<phase>", run_hdf5,
        "hdf5_{key}", "hdf5_{key}",
        outs=lambda c, k: [c.hdf5_dir(k)],
        deps=_phase_data,
        # `datasets`: a dataset added to params.yaml re-runs the stage, which then checks that dvc.yaml lists it
        params=lambda c, k: [*MODEL_PARAMS, f"hdf5.{k}", "datasets"],
        files=_model_files,
    ),
    Stage(
        "validate", "phase", "validate", "stage 3 gate: Great Expectations suites -> data/hdf5/<phase>.validation.json",
        run_validate, None, "validate_{key}",
        outs=lambda c, k: [c.validation_path(k)],
        deps=lambda c, k: [c.hdf5_dir(k), *_phase_data(c, k)],
        checks="hdf5",
        params=lambda c, k: [f"hdf5.{k}"],
        in_git=lambda c, k: {c.validation_path(k): "outs"},
    ),
    Stage(
        "train", "phase", "train", "stage 4: train one phase under accelerate launch", run_train,
        "checkpoint_{key}", "train_{key}",
        outs=lambda c, k: [c.checkpoint_dir(k), c.train_report_dir(k)],
        deps=_train_deps,
        params=lambda c, k: [*MODEL_PARAMS, f"train.{k}"],
        files=lambda c, k: _model_files(c) + _local(c, [c.train[k].accelerate_config]),
        in_git=lambda c, k: {c.train_report_dir(k): "outs"},
        code=("llava_core.training.recipe",),  # `accelerate launch -m llava_core.training.recipe`
    ),
    Stage(
        "export_hf", None, "export", "stage 5a: the final checkpoint -> models/hf", run_export,
        "hf_model", "export_hf",
        outs=lambda c, k: [c.model_dir("hf")],
        deps=lambda c, k: [c.checkpoint_dir(FINAL_PHASE)],
        params=lambda c, k: [f"hdf5.{FINAL_PHASE}.prompt_style", "export"],  # the chat template, the shards
    ),
    Stage(
        "export_llava", None, "export-llava", "stage 5a: the final checkpoint -> models/llava (original LLaVA layout)",
        run_export_llava, "llava_model", "export_llava",
        outs=lambda c, k: [c.model_dir("llava")],
        deps=lambda c, k: [c.checkpoint_dir(FINAL_PHASE)],
        params=lambda c, k: ["export"],
    ),
    Stage(
        "evaluate", None, "evaluate", "stage 5b: answer the held-out questions -> reports/eval.json", run_evaluate,
        "eval_report", "evaluate",
        outs=lambda c, k: [c.report_file(), c.report_file(ANSWERS)],
        deps=lambda c, k: [c.model_dir("hf"), *_eval_source_dir(c), c.hdf5_dir(FINAL_PHASE)],  # suffix statistics,
        params=lambda c, k: ["eval", "seed"],
        in_git=lambda c, k: {c.report_file(): "metrics"},
    ),
)  # fmt: skip
STAGE_BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    return STAGE_BY_NAME[choose("stage", name, STAGE_BY_NAME)]


def steps(cfg: PipelineConfig) -> list[tuple[Stage, Any]]:
    """Every (stage, key) of the whole chain in dependency order: all downloads, all conversions, then per
    phase the data, its gate and its training, then the exports and the evaluation."""
    order: list[tuple[Stage, Any]] = []
    for s in STAGES:
        order += [(s, k) for k in s.keys(cfg)]
    return order


def producer(cfg: PipelineConfig, path: Path) -> tuple[Stage, Any] | None:
    """The (stage, key) whose outputs include `path`, or None (an input from outside the pipeline)."""
    for s, k in steps(cfg):
        if Path(path) in s.outs(cfg, k):
            return s, k
    return None


def asset_inputs(cfg: PipelineConfig, s: Stage, key: Any) -> list[str]:
    """The assets a stage's asset depends on: the producers of its inputs (a gate's output stands for the asset
    it checks), in input order, without repeats."""
    out: list[str] = []
    for path in s.deps(cfg, key):
        found = producer(cfg, path)
        if found is None:
            continue
        src, src_key = found
        name = stage(src.checks).asset_name(src_key) if src.checks else src.asset_name(src_key)
        if name not in out:
            out.append(name)
    return out


def run_all(cfg: PipelineConfig, log=print, after: Callable[[Stage, Any], None] | None = None) -> dict:
    """Every stage in dependency order; returns each stage's summary and its wall time. `after(stage, key)` runs
    when a stage has finished (the CLI records it in dvc.lock there)."""
    out: dict[str, Any] = {"seconds": {}}
    for s, key in steps(cfg):
        name = s.command if key is None else f"{s.command} {key}"
        t0 = time.perf_counter()
        log(f"==> {name}")
        result = s.run(cfg) if key is None else s.run(cfg, key)
        if after is not None:
            after(s, key)
        out["seconds"][name] = round(time.perf_counter() - t0, 2)
        if key is None:
            out[s.name] = result
        else:
            out.setdefault(s.name, {})[key] = result
    return out
