"""Stages 1-3: the workspace folders, the sources, the datasets (conversion) and the HDF5 settings per phase."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from llava_core.config.base import (
    Fraction,
    Positive,
    Schema,
    _check_choice,
)
from llava_core.data.converters import CONVERTERS
from llava_core.data.fetch import HEX64, check_hf_revision
from llava_core.data.prompts import PROMPT_STYLES, PROMPT_SUFFIXES
from llava_core.data.synthetic import GENERATORS
from llava_core.phases import PHASE_NAMES
from llava_core.presets import PRESETS, RESOURCES, resource_path  # noqa: F401  (RESOURCES re-exported)

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
