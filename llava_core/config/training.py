"""Stage 4 and the model: the training settings per phase (LoRA, SLURM) and the towers, projector, tokenizer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationInfo, field_validator, model_validator

from llava_core.config.base import (
    Fraction,
    NonNegative,
    Positive,
    Schema,
)
from llava_core.presets import PRESETS, RESOURCES, resource_path  # noqa: F401  (RESOURCES re-exported)


class LoraConfig(Schema):
    """LoRA adapters (peft) on the language model's projections; the base LM weights stay frozen."""

    r: Positive = Field(8, description="adapter rank")
    alpha: Annotated[float, Field(gt=0)] = Field(16, description="scaling numerator (alpha / r)")
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(0.05, description="dropout on the adapter input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, description="module names"
    )


# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes, days-hours:minutes:seconds
SLURM_TIME_RE = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE")


class SlurmConfig(Schema):
    """A training phase as a SLURM job (`launcher: slurm`): what sbatch asks for (docs/gpus-and-clusters.md)."""

    partition: str | None = Field(None, description="sbatch --partition; null: the cluster's default partition")
    nodes: Positive = Field(1, description="machines (sbatch --nodes); each runs one accelerate launch")
    gpus_per_node: NonNegative = Field(0, description="GPUs per machine, one process each; 0: accelerate config's")
    cpus_per_task: Positive | None = Field(None, description="CPUs of each machine's launch (sbatch --cpus-per-task)")
    time_limit: str | None = Field(None, description="wall-clock limit, e.g. 12:00:00 or 2-00:00:00 (sbatch --time)")
    account: str | None = Field(None, description="the account the job is charged to (sbatch --account)")
    signal_grace_s: Positive = Field(120, description="SIGTERM this long before the time limit: checkpoint, requeue")
    requeue: bool = Field(True, description="a preempted or timed-out job saves a checkpoint and is requeued")
    extra_args: list[str] = Field(default_factory=list, description="more sbatch options, e.g. ['--qos=high']")
    setup: list[str] = Field(
        default_factory=list, description="shell lines the job runs first, e.g. 'module load cuda'"
    )

    @model_validator(mode="after")
    def _sbatch_values(self) -> SlurmConfig:
        if self.time_limit is not None and not SLURM_TIME_RE.fullmatch(self.time_limit):
            raise ValueError(f"time_limit {self.time_limit!r} is no SLURM time (minutes, [days-]hours:minutes:seconds)")
        if bad := [a for a in self.extra_args if not a.startswith("--") or "\n" in a]:
            raise ValueError(f"extra_args {bad}: each entry is one sbatch option starting with --")
        return self


class TrainPhaseConfig(Schema):
    """Stage 4 for one phase: the optimisation and how the run is launched, observed and checkpointed."""

    epochs: Annotated[float, Field(gt=0)] = Field(description="passes over the data (fractions allowed)")
    global_batch_size: Positive = Field(description="examples per optimizer step, over all processes")
    micro_batch_size: Positive = Field(description="examples per forward pass on one process")
    learning_rate: Annotated[float, Field(gt=0)] = Field(description="peak learning rate (AdamW)")
    warmup_ratio: Fraction = Field(0.03, description="share of the steps spent warming up linearly")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW decoupled weight decay")
    max_grad_norm: Annotated[float, Field(gt=0)] = Field(1.0, description="gradient clipping norm")
    freeze: list[str] = Field(default_factory=list, description="regex patterns of parameters that do not train")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast precision")
    accelerate_config: str = Field("configs/accelerate/cpu.yaml", description="accelerate launch config file")
    log_every: Positive = Field(10, description="optimizer steps per metrics record")
    num_workers: NonNegative = Field(0, description="data loader worker processes")
    save_every: NonNegative = Field(0, description="steps between resumable checkpoints; 0: none before the end")
    keep_last: Positive = Field(2, description="resumable checkpoints kept while the phase runs")
    resume: Literal["auto", "never"] = Field("auto", description="auto: continue a partial run of the same config")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    group_by_modality_length: bool = Field(False, description="image and text-only records in separate batches")
    lora: LoraConfig | None = Field(None, description="LoRA on the LM (merged into the saved weights at the end)")
    trackers: list[Literal["dvclive", "tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["dvclive", "tensorboard"],
        description="where the run's metrics go: dvclive (reports/train/<phase>/, for `dvc exp show` and "
        "`dvc plots`), tensorboard (the checkpoint's tensorboard/), mlflow (MLFLOW_TRACKING_URI), wandb (WANDB_MODE)",
    )
    peak_tflops: Annotated[float, Field(gt=0)] | None = Field(None, description="per-device peak for MFU")
    launcher: Literal["local", "slurm"] = Field("local", description="local: accelerate launch here; slurm: a job")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="the SLURM job (launcher: slurm)")

    def processes(self, launch_processes: int) -> int:
        """Processes over all machines: the SLURM job's GPUs if it asks for some, else the accelerate config's."""
        sc = self.slurm
        return sc.nodes * sc.gpus_per_node if self.launcher == "slurm" and sc.gpus_per_node else launch_processes

    @field_validator("trackers")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"{v}: a tracker is listed twice")
        return v

    @field_validator("freeze")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression ({e})") from None
        return v

    @model_validator(mode="after")
    def _batches(self, info: ValidationInfo) -> TrainPhaseConfig:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}"
            )
        base = (info.context or {}).get("base_dir")
        if base is None:
            return self
        path = Path(self.accelerate_config)
        if not path.is_absolute() and (Path(base) / path).is_file():  # as PipelineConfig.resolve_file does
            path = Path(base) / path
        if not path.is_file():
            raise ValueError(f"accelerate_config {self.accelerate_config!r} not found (looked at {path})")
        try:
            launch = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"accelerate_config {path} is not valid YAML ({e})") from None
        procs = self.processes(launch.get("num_processes", 1) if isinstance(launch, dict) else 1)
        if isinstance(procs, int) and procs > 0 and self.global_batch_size % (self.micro_batch_size * procs):
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by micro_batch_size "
                f"{self.micro_batch_size} x {procs} processes ({self.accelerate_config})"
            )
        return self


class ModelConfig(Schema):
    """A vision tower, a language model and a projector; each tower from a pretrained folder or a config."""

    vision_pretrained: str | None = Field(None, description="CLIP folder or hub id")
    vision_config: dict[str, Any] | None = Field(None, description="CLIPVisionConfig fields (random init)")
    text_pretrained: str | None = Field(None, description="causal LM folder or hub id")
    text_config: dict[str, Any] | None = Field(None, description="LlamaConfig fields (random init)")
    tokenizer: str = Field(
        min_length=1, description="tokenizer folder, hub id, or `resource:<folder>` (packaged in llava_core/resources)"
    )
    projector: Literal["mlp2x_gelu"] = Field("mlp2x_gelu", description="Linear-GELU-Linear")
    vision_feature_layer: int = Field(-2, description="hidden state of the vision tower fed to the projector")
    image_size: Positive = Field(336, description="pixels of the square input image")
    init_seed: int = Field(0, description="seed of the random initialisation")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="dtype the weights are held in while training, whatever the pretrained files store (Vicuna-v1.5 "
        "is fp16): float32 with mixed precision from train.<phase>.mixed_precision, or bfloat16 for pure bf16",
    )

    @field_validator("tokenizer")
    @classmethod
    def _known_resource(cls, v: str) -> str:
        packaged = resource_path(v)
        if packaged is not None and not packaged.is_dir():
            valid = sorted(f"resource:{p.name}" for p in RESOURCES.iterdir() if p.is_dir())
            raise ValueError(f"{v!r}: no such packaged folder; valid: {', '.join(valid)}")
        return v

    @model_validator(mode="after")
    def _one_of_each(self) -> ModelConfig:
        for tower in ("vision", "text"):
            if (getattr(self, f"{tower}_pretrained") is None) == (getattr(self, f"{tower}_config") is None):
                raise ValueError(f"set exactly one of {tower}_pretrained and {tower}_config")
        return self
