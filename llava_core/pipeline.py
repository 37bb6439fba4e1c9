"""The stages in order, each returning a JSON-ready summary: shared by the CLI and `dvc.yaml`.

Dagster assets call the same stage functions (`sources.download`, `convert.convert`, `hdf5.build_hdf5`,
`validate.validate_phase` (asset checks),
`train.train`, `checkpoint.export_hf`, `checkpoint.export_llava`, `evaluate.evaluate`, `publish.publish`)
directly; this module adds only the plain summaries and `run_all`, the order of the whole chain.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from llava_core.config import PHASES, PipelineConfig

# Stage modules are imported inside the runners: `dvc repro` starts one process per stage, and the data
# stages should not pay for importing torch and transformers (about 10 s on 2 cores).


def _plain(result: Any) -> dict:
    return {k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in dataclasses.asdict(result).items()}


def run_download(cfg: PipelineConfig, source: str, refetch: bool = False) -> dict:
    from llava_core.sources import download

    return _plain(download(cfg, source, refetch=refetch))


def run_convert(cfg: PipelineConfig, dataset: str) -> dict:
    from llava_core.convert import convert

    return _plain(convert(cfg, dataset))


def run_hdf5(cfg: PipelineConfig, phase: str) -> dict:
    from llava_core.hdf5 import build_hdf5

    return _plain(build_hdf5(cfg, phase))


def run_validate(cfg: PipelineConfig, phase: str) -> dict:
    """The data gate: both suites on the built phase; raises `ValidationFailed` (its summary) on failure."""
    from llava_core.validate import ValidationFailed, validate_phase

    r = validate_phase(cfg, phase)
    if not r.success:
        raise ValidationFailed(r.summary())
    return {"phase": phase, "path": str(r.path), "success": True, "summary": r.summary()}


def run_train(cfg: PipelineConfig, phase: str, num_processes: int | None = None) -> dict:
    from llava_core.launch import train  # starts the training process; no torch here

    return _plain(train(cfg, phase, num_processes=num_processes))


def run_export(cfg: PipelineConfig) -> dict:
    from llava_core.checkpoint import export_hf

    return _plain(export_hf(cfg))


def run_export_llava(cfg: PipelineConfig) -> dict:
    from llava_core.checkpoint import export_llava

    return _plain(export_llava(cfg))


def run_import_hf(cfg: PipelineConfig, hf_dir, out=None, prompt_style: str = "vicuna_v1") -> dict:
    """A Hugging Face LLaVA folder -> a training-format checkpoint (default `<checkpoints>/imported`)."""
    from llava_core.checkpoint import import_hf

    return _plain(import_hf(hf_dir, out or cfg.path("checkpoints") / "imported", prompt_style))


def run_evaluate(cfg: PipelineConfig) -> dict:
    from llava_core.evaluate import evaluate

    return evaluate(cfg).report


def run_judge(cfg: PipelineConfig) -> dict:
    from llava_core.evaluate import judge_answers

    return judge_answers(cfg).report


def run_publish(cfg: PipelineConfig) -> dict:
    from llava_core.publish import publish

    return _plain(publish(cfg))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the whole chain: `llava-pipeline <cli...>` runs `run(cfg, *args)`; its summary goes to
    `run_all`'s result under `group` (and `key` when the group has one per source, dataset or phase)."""

    group: str
    key: str | None
    cli: tuple[str, ...]
    run: Callable[..., Any]
    args: tuple = ()


def stages(cfg: PipelineConfig) -> list[Stage]:
    """Every stage of `llava-pipeline all`, in dependency order (also what the benchmarks run one by one)."""
    out = [Stage("download", s, ("download", s), run_download, (s,)) for s in cfg.sources]
    out += [Stage("convert", d, ("convert", d), run_convert, (d,)) for d in cfg.datasets]
    for group, runner in (("hdf5", run_hdf5), ("validate", run_validate), ("train", run_train)):
        out += [Stage(group, p, (group, p), runner, (p,)) for p in PHASES]
    return out + [
        Stage("export", None, ("export",), run_export),
        Stage("export_llava", None, ("export-llava",), run_export_llava),
        Stage("eval", None, ("evaluate",), run_evaluate),
    ]


def run_all(cfg: PipelineConfig, log=print) -> dict:
    """Every stage in dependency order; returns each stage's summary and its wall time."""
    out: dict[str, Any] = {"seconds": {}}
    for stage in stages(cfg):
        name = " ".join(stage.cli)
        t0 = time.perf_counter()
        log(f"==> {name}")
        result = stage.run(cfg, *stage.args)
        out["seconds"][name] = round(time.perf_counter() - t0, 2)
        if stage.key is None:
            out[stage.group] = result
        else:
            out.setdefault(stage.group, {})[stage.key] = result
    return out
