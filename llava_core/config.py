"""The one configuration schema: what every params.yaml key means, its type, range and cross-field rules.

The pydantic models below are the one place that says what a params key means (docs/params.md is generated
from them: `llava-pipeline params`). Values are coerced where YAML is loose (`2e-5` is read by PyYAML as a
string and becomes a float) and refused where they cannot be used; an unknown key names the valid ones.
`llava_core.params` reads a file into a `PipelineConfig`, reporting every problem at once with its key path.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from llava_core.artifacts import CONVERT_REPORT_SUFFIX, EVAL_REPORT, JSONL_SUFFIX, TRAIN_REPORTS, VALIDATION_SUFFIX
from llava_core.data.converters import CONVERTERS
from llava_core.data.fetch import HEX64, check_hf_revision
from llava_core.data.prompts import PROMPT_STYLES, PROMPT_SUFFIXES
from llava_core.data.synthetic import GENERATORS
from llava_core.evaluation.metrics import METRICS
from llava_core.phases import FINAL_PHASE, PHASE_NAMES
from llava_core.presets import PRESETS, RESOURCES, resource_path  # noqa: F401  (RESOURCES re-exported)

NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


# The source kinds and the options each reads (generated: the generator's own options).
SOURCE_KIND_OPTIONS: dict[str, frozenset[str] | None] = {
    "generated": None,
    "local": frozenset(),
    "hf": frozenset({"repo_type"}),
    "s3": frozenset(
        {"endpoint_url", "region", "multipart_threshold", "multipart_chunksize", "max_concurrency", "max_attempts"}
    ),
    "http": frozenset({"filename", "retries", "timeout_s", "backoff_s"}),
}


class ConfigError(ValueError):
    """A configuration that cannot be used: every problem found, each as `key.path: message`."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None) -> None:
        self.errors, self.source = errors, source
        lines = [f"{where}: {msg}" if where else msg for where, msg in errors]
        head = f"{source}: " if source else ""
        if len(lines) == 1:
            text = head + lines[0]
        else:
            text = f"{head}{len(lines)} problems\n" + "\n".join(f"  {line}" for line in lines)
        super().__init__(text)


class Schema(BaseModel):
    """Unknown keys are errors; values are coerced where that is unambiguous ("32" -> 32, "2e-5" -> 2e-5)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _check_choice(value: str, valid, what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(sorted(valid))}")
    return value


# --- sections ------------------------------------------------------------------------------------------------


class Workspace(Schema):
    """Where each stage writes, relative to `root` (itself relative to the params file's folder)."""

    root: str = Field(".", description="the workspace folder, relative to the params file's folder")
    raw: str = Field("data/raw", description="stage 1: one folder per source (also the image root)")
    jsonl: str = Field("data/jsonl", description="stage 2: one `<dataset>.jsonl` per dataset")
    hdf5: str = Field("data/hdf5", description="stage 3: one folder per phase")
    checkpoints: str = Field("checkpoints", description="stage 4: one folder per phase")
    models: str = Field("models", description="stage 5: `hf/` and `llava/`")
    reports: str = Field("reports", description="stage 5: `eval.json`, `answers.jsonl`")

    def path(self, name: str) -> Path:
        return Path(self.root) / getattr(self, name)


class SourceConfig(Schema):
    """A dataset source, fetched by stage 1 into `<raw>/<source>/`."""

    kind: Literal["generated", "local", "hf", "s3", "http"] = Field(description="where the files come from")
    generator: str | None = Field(None, description="generated: the generator (synthetic_shapes)")
    location: str | None = Field(None, description="local folder, hf repo id, s3://bucket/prefix or http(s) URL")
    options: dict[str, Any] = Field(default_factory=dict, description="the generator's or the transfer's settings")
    revision: str | None = Field(None, description="hf: the pinned commit sha (40 hex)")
    sha256: str | None = Field(None, description="http: the file's sha256 (64 hex)")
    patterns: list[str] = Field(default_factory=list, description="hf, s3: glob patterns of the files to fetch")
    extract: bool = Field(False, description="extract arriving archives (zip, tar, tar.gz), then remove them")

    @model_validator(mode="after")
    def _per_kind(self) -> SourceConfig:
        kind, valid = self.kind, SOURCE_KIND_OPTIONS[self.kind]
        if valid is not None and set(self.options) - valid:
            raise ValueError(
                f"options: unknown key(s) {sorted(set(self.options) - valid)} for kind {kind!r}; valid: {sorted(valid)}"
            )
        if kind == "generated":
            if not self.generator:
                raise ValueError("a generated source needs 'generator'")
            _check_choice(self.generator, GENERATORS, "generator")
            valid_options = [f.name for f in dataclasses.fields(GENERATORS[self.generator].options)]
            if set(self.options) - set(valid_options):
                raise ValueError(
                    f"options: unknown key(s) {sorted(set(self.options) - set(valid_options))} for generator "
                    f"{self.generator!r}; valid: {', '.join(valid_options)}"
                )
            try:
                GENERATORS[self.generator].options(**self.options)
            except (TypeError, ValueError) as e:
                raise ValueError(f"options: {e}") from None
        elif not self.location:
            raise ValueError(f"a {kind} source needs 'location'")
        for key, kinds in (("revision", ("hf",)), ("sha256", ("http",)), ("patterns", ("hf", "s3"))):
            if getattr(self, key) and kind not in kinds:
                raise ValueError(f"'{key}' applies to {' and '.join(kinds)} sources only, not {kind!r}")
        if kind == "hf":
            check_hf_revision(self.location, self.revision)
        if kind == "s3" and not self.location.startswith("s3://"):
            raise ValueError(f"location {self.location!r}: an s3 source location must look like s3://bucket/prefix")
        if kind == "http":
            if not re.match(r"https?://", self.location):
                raise ValueError(f"location {self.location!r}: an http source needs an http:// or https:// URL")
            if not self.sha256 or not HEX64.fullmatch(self.sha256.lower()):
                raise ValueError("an http source needs 'sha256' (64 hex characters) to verify the download")
        return self


class DatasetConfig(Schema):
    """One conversion (stage 2): a file of a downloaded source, a converter, and the phase its records train."""

    source: str = Field(description="a name under `sources`")
    file: str = Field(description="a file, a folder or a glob inside the source folder")
    converter: str = Field(description="one of the converters (docs/stages.md)")
    phase: str = Field(description="the phase whose HDF5 the records go to")
    image_prefix: str | None = Field(None, description="prepended to image paths; default `<source>/`")
    options: dict[str, Any] = Field(default_factory=dict, description="the converter's options")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str, info: ValidationInfo) -> str:
        return _check_choice(v, (info.context or {}).get("sources", [v]), "source")

    @field_validator("converter")
    @classmethod
    def _known_converter(cls, v: str) -> str:
        return _check_choice(v, CONVERTERS, "converter")

    @field_validator("phase")
    @classmethod
    def _known_phase(cls, v: str) -> str:
        return _check_choice(v, PHASE_NAMES, "phase")

    @model_validator(mode="after")
    def _converter_options(self) -> DatasetConfig:
        valid = set(CONVERTERS[self.converter].options)
        if set(self.options) - valid:
            raise ValueError(
                f"options: unknown key(s) {sorted(set(self.options) - valid)} for converter {self.converter!r}; "
                f"valid: {sorted(valid)}"
            )
        if "suffix" in valid and self.options.get("suffix", "none") not in PROMPT_SUFFIXES:
            raise ValueError(
                f"options: suffix {self.options['suffix']!r} is not an evaluation suffix; valid: {', '.join(PROMPT_SUFFIXES)}"
            )
        return self


Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Hdf5PhaseConfig(Schema):
    """Stage 3 for one phase: tokenisation, image slots, shards."""

    prompt_style: Literal[PROMPT_STYLES] = Field(description="conversation layout: plain (phase 1) or a chat style")
    max_sequence_length: Positive = Field(description="tokens per example (MSL); longer records are dropped")
    shard_size: Positive = Field(2000, description="examples per output file")
    min_image_size: Positive = Field(8, description="shorter image side in pixels; smaller images are rejected")
    num_workers: Positive = Field(1, description="writer processes (the output is byte-identical for any number)")
    max_discarded_fraction: Fraction = Field(0.05, description="the gate fails above this share of rejected records")

    @model_validator(mode="after")
    def _room_for_text(self, info: ValidationInfo) -> Hdf5PhaseConfig:
        patches = (info.context or {}).get("num_patches")
        if patches is not None and self.max_sequence_length <= patches + 2:
            raise ValueError(
                f"max_sequence_length {self.max_sequence_length} leaves no room for text after {patches} image patches"
            )
        return self


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


# checked per value, so an error's key path ends at the category (`eval.metrics.<category>`)
MetricName = Literal[tuple(METRICS)]
SuffixName = Literal[tuple(PROMPT_SUFFIXES)]


class JudgeConfig(Schema):
    """A judge model behind an OpenAI-compatible endpoint (POST {base_url}/chat/completions), LLaVA-Bench style."""

    base_url: str = Field(description="the endpoint, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="the judge model's name")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="the variable holding the key; null: keyless")
    categories: list[str] = Field(default_factory=list, description="question categories to review; empty: all")
    temperature: Annotated[float, Field(ge=0)] = Field(0.2, description="sampling temperature of the judge")
    max_tokens: Positive = Field(1024, description="longest review the judge may write")
    timeout_s: Annotated[float, Field(gt=0)] = Field(60.0, description="seconds to wait for one reply")
    max_retries: NonNegative = Field(2, description="extra attempts after a connection error, 429 or 5xx")
    retry_wait_s: Annotated[float, Field(ge=0)] = Field(2.0, description="seconds before the first retry (grows)")


AUTO_SUFFIX = "auto"  # eval.prompt_suffix: the form the training questions had (llava_core/evaluation/suffixes.py)


class EvalCategoryConfig(Schema):
    """One question category's settings."""

    dataset: str | None = Field(None, description="the phase-2 dataset its questions come from; null: all of them")

    @field_validator("dataset")
    @classmethod
    def _final_phase_dataset(cls, v: str | None, info: ValidationInfo) -> str | None:
        phases = (info.context or {}).get("dataset_phases")
        if v is None or phases is None:
            return v
        valid = [d for d, p in phases.items() if p == FINAL_PHASE]
        if v not in valid:
            raise ValueError(f"{v!r} is not a {FINAL_PHASE} dataset; valid: {', '.join(valid) or '(none configured)'}")
        return v


class EvalConfig(Schema):
    """Stage 5b: the held-out questions, how they are asked and scored."""

    questions: str = Field(description="questions jsonl, relative to the raw folder")
    image_folder: str = Field(description="their images, relative to the raw folder")
    batch_size: Positive = Field(32, description="questions per generation batch")
    max_new_tokens: Positive = Field(16, description="greedy decoding length")
    prompt_style: Literal[PROMPT_STYLES] = Field("vicuna_v1", description="the conversation layout")
    prompt_suffix: Literal[(AUTO_SUFFIX, *PROMPT_SUFFIXES)] = Field(
        AUTO_SUFFIX, description="suffix of categories not in `suffixes`: auto (as the phase-2 data asked) or a name"
    )
    metrics: dict[str, MetricName] = Field(default_factory=dict, description="category -> metric name")
    default_metric: MetricName = Field("exact_match", description="the metric of categories not in `metrics`")
    suffixes: dict[str, SuffixName] = Field(default_factory=dict, description="category -> a PROMPT_SUFFIXES name")
    categories: dict[str, EvalCategoryConfig] = Field(default_factory=dict, description="category -> its settings")
    judge: JudgeConfig | None = Field(None, description="optional judge review of the answers")

    @field_validator("prompt_suffix", mode="before")
    @classmethod
    def _suffix_text(cls, v: Any) -> Any:
        """Params files before `auto` gave the suffix's text: read as its name."""
        return {text: name for name, text in PROMPT_SUFFIXES.items()}.get(v, v) if isinstance(v, str) else v


class PublishConfig(Schema):
    """Optional upload of converted models to S3 (credentials from the environment, as boto3 finds them)."""

    bucket: str = Field(min_length=1, description="the bucket")
    prefix: str = Field("llava-pipeline", description="key prefix")
    endpoint_url: str | None = Field(None, description="e.g. a MinIO or moto server; null: AWS")
    region: str | None = Field(None, description="the bucket's region; null: boto3's default")
    models: list[Literal["hf", "llava"]] = Field(default_factory=lambda: ["hf"], description="folders under models/")


# "5GB", "500MB", "2GiB" or a number of bytes, as transformers' `max_shard_size` reads them
SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
SIZE_UNITS = {"": 1, "B": 1, **{f"{u}B": 1000 ** (i + 1) for i, u in enumerate("KMGT")}}
SIZE_UNITS.update({f"{u}IB": 1024 ** (i + 1) for i, u in enumerate("KMGT")})


def size_in_bytes(value: int | str) -> int:
    """`5GB` -> 5 * 10**9, `2MiB` -> 2 * 2**20, an int or digits -> itself; ValueError for anything else."""
    m = SIZE_RE.fullmatch(str(value).strip())
    if m is None or isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size: write e.g. 5GB, 500MB, 2GiB or a number of bytes")
    n = int(float(m.group(1)) * SIZE_UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise ValueError(f"{value!r}: a size must be above 0 bytes")
    return n


class ExportConfig(Schema):
    """Stage 5a: how the exported model folders are written."""

    max_shard_size: int | str = Field(
        "5GB",
        description="largest weight file of an export (5GB, 500MB, 2GiB or bytes); above it the weights are "
        "split into shards listed in model.safetensors.index.json",
    )

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        size_in_bytes(v)
        return v

    @property
    def max_shard_bytes(self) -> int:
        return size_in_bytes(self.max_shard_size)


class RegistryConfig(Schema):
    """Optional: after a successful evaluation, Dagster registers the model (GTO tags on dvc.yaml's artifacts)."""

    artifact: Literal["llava-hf", "llava-original"] = Field("llava-hf", description="the dvc.yaml artifact")
    bump: Literal["major", "minor", "patch"] = Field("minor", description="the semver part the new version bumps")
    stage: str | None = Field("dev", pattern=r"^[a-z][a-z0-9-]*$", description="stage assigned to it; null: none")
    min_accuracy: Fraction | None = Field(None, description="register only when overall_accuracy reaches this")
    push: bool = Field(False, description="push the model to the DVC remote, the commit and tags to git's origin")


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
