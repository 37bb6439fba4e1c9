"""Stage 5 and after: the evaluation (judge, categories), the export, the upload and the model registry."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from llava_core.config.base import (
    Fraction,
    NonNegative,
    Positive,
    Schema,
    size_in_bytes,
)
from llava_core.data.prompts import PROMPT_STYLES, PROMPT_SUFFIXES
from llava_core.evaluation.metrics import METRICS
from llava_core.phases import FINAL_PHASE
from llava_core.presets import PRESETS, RESOURCES, resource_path  # noqa: F401  (RESOURCES re-exported)

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
