"""The one configuration schema: what every params.yaml key means, its type, range and cross-field rules.

The sections live by stage in `base` (the error, the model base, shared types), `data` (stages 1-3), `training`
(stage 4, the model) and `outputs` (evaluation, export, publish, registry); this module joins them in
`PipelineConfig` and re-exports every name, so `from llava_core.config import X` is the one import.

The pydantic models below are the one place that says what a params key means (docs/params.md is generated
from them: `llava-pipeline params`). Values are coerced where YAML is loose (`2e-5` is read by PyYAML as a
string and becomes a float) and refused where they cannot be used; an unknown key names the valid ones.
`llava_core.params` reads a file into a `PipelineConfig`, reporting every problem at once with its key path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from llava_core.artifacts import CONVERT_REPORT_SUFFIX, EVAL_REPORT, JSONL_SUFFIX, TRAIN_REPORTS, VALIDATION_SUFFIX
from llava_core.config.base import (
    NAME_RE,
    ConfigError,
    Fraction,
    NonNegative,
    Positive,
    Schema,
    size_in_bytes,
)
from llava_core.config.data import SOURCE_KIND_OPTIONS, DatasetConfig, Hdf5PhaseConfig, SourceConfig, Workspace
from llava_core.config.outputs import (
    AUTO_SUFFIX,
    EvalCategoryConfig,
    EvalConfig,
    ExportConfig,
    JudgeConfig,
    MetricName,
    PublishConfig,
    RegistryConfig,
    SuffixName,
)
from llava_core.config.training import LoraConfig, ModelConfig, SlurmConfig, TrainPhaseConfig
from llava_core.phases import PHASE_NAMES
from llava_core.presets import RESOURCES, resource_path

__all__ = [
    "AUTO_SUFFIX", "NAME_RE", "RESOURCES", "SOURCE_KIND_OPTIONS", "ConfigError", "DatasetConfig", "EvalCategoryConfig",
    "EvalConfig", "ExportConfig", "Fraction", "Hdf5PhaseConfig", "JudgeConfig", "LoraConfig", "MetricName",
    "ModelConfig", "NonNegative", "PipelineConfig", "Positive", "PublishConfig", "RegistryConfig", "Schema",
    "SlurmConfig", "SourceConfig", "SuffixName", "TrainPhaseConfig", "Workspace", "size_in_bytes",
]  # fmt: skip


def _named(v: dict, what: str) -> dict:
    for name in v:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(
                f"{what} name {name!r}: names are Dagster asset keys and DVC stage names; "
                "use letters, digits and underscores, starting with a letter"
            )
    return v


def _phases(v: Any, what: str) -> Any:
    if not isinstance(v, dict):
        return v  # the type error is reported by the field itself
    unknown, missing = sorted(set(v) - set(PHASE_NAMES)), sorted(set(PHASE_NAMES) - set(v))
    if unknown:
        raise ValueError(f"unknown phase(s) {unknown}; valid: {', '.join(PHASE_NAMES)}")
    if missing:
        raise ValueError(f"missing phase(s) {missing}; {what} needs {', '.join(PHASE_NAMES)}")
    return v


class PipelineConfig(Schema):
    """The whole resolved configuration every stage takes."""

    preset: str = Field("tiny", description="the model preset the sections are merged over")
    seed: NonNegative = Field(0, description="data shuffling, training order")
    workspace: Workspace = Field(default_factory=Workspace, description="where each stage writes")
    model: ModelConfig = Field(description="the towers, the projector and the tokenizer (merged over the preset)")
    sources: dict[str, SourceConfig] = Field(default_factory=dict, description="stage 1: name -> source")
    datasets: dict[str, DatasetConfig] = Field(default_factory=dict, description="stage 2: name -> conversion")
    hdf5: dict[str, Hdf5PhaseConfig] = Field(description="stage 3: phase -> settings (merged over the preset)")
    train: dict[str, TrainPhaseConfig] = Field(description="stage 4: phase -> settings (merged over the preset)")
    eval: EvalConfig = Field(description="stage 5b: the held-out evaluation")
    export: ExportConfig = Field(default_factory=ExportConfig, description="stage 5a: how the exports are written")
    publish: PublishConfig | None = Field(None, description="optional upload of the exported models to S3")
    registry: RegistryConfig | None = Field(None, description="optional: register the model after its evaluation")
    base_dir: Path = Field(Path("."), exclude=True, description="the params file's folder (not a params key)")

    @field_validator("sources", "datasets")
    @classmethod
    def _names(cls, v: dict, info: ValidationInfo) -> dict:
        return _named(v, info.field_name.rstrip("s"))

    @field_validator("hdf5", "train", mode="before")
    @classmethod
    def _all_phases(cls, v: dict, info: ValidationInfo) -> dict:
        return _phases(v, info.field_name)

    # --- paths -------------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        p = self.workspace.path(name)
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def root(self) -> Path:
        root = Path(self.workspace.root)
        return root if root.is_absolute() else self.base_dir / root

    def rel(self, path: Path) -> str:
        """`path` relative to the workspace root (`/`-separated), as artifacts record it; else as given."""
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)

    def raw_dir(self, source: str) -> Path:
        return self.path("raw") / source

    def jsonl_path(self, dataset: str) -> Path:
        return self.path("jsonl") / f"{dataset}{JSONL_SUFFIX}"

    def hdf5_dir(self, phase: str) -> Path:
        return self.path("hdf5") / phase

    def checkpoint_dir(self, phase: str) -> Path:
        return self.path("checkpoints") / phase

    def convert_report(self, dataset: str) -> Path:
        return self.path("jsonl") / f"{dataset}{CONVERT_REPORT_SUFFIX}"

    def validation_path(self, phase: str) -> Path:
        """Beside the HDF5 folder (not inside it: that folder is the output of the hdf5 stage)."""
        return self.path("hdf5") / f"{phase}{VALIDATION_SUFFIX}"

    def model_dir(self, fmt: str) -> Path:
        """`models/hf` or `models/llava`."""
        return self.path("models") / fmt

    def report_file(self, name: str = EVAL_REPORT) -> Path:
        return self.path("reports") / name

    def train_report_dir(self, phase: str) -> Path:
        """`reports/train/<phase>/`: the phase's tracker folder (DVCLive), kept in git for experiments."""
        return self.path("reports") / TRAIN_REPORTS / phase

    @property
    def image_root(self) -> Path:
        return self.path("raw")

    def datasets_for(self, phase: str) -> list[str]:
        return [n for n, d in self.datasets.items() if d.phase == phase]

    def resolve_file(self, p: str) -> str:
        """A relative path in the config (accelerate config, tokenizer folder) resolves against base_dir; a
        `resource:<folder>` name (presets.py) to the folder packaged in llava_core/resources."""
        packaged = resource_path(p)
        if packaged is not None:
            return str(packaged)
        path = Path(p)
        if path.is_absolute() or not (self.base_dir / path).exists():
            return p
        return str(self.base_dir / path)

    def to_dict(self) -> dict:
        """Every key, as a params file would hold it (`config_from_dict` reads it back)."""
        return self.model_dump(mode="json")

    def stage_view(self, *keys: str) -> dict:
        """The part of the resolved config one stage depends on (written next to its artifacts)."""
        d = self.to_dict()
        return {k: d[k] for k in ("preset", "seed", *keys)}
