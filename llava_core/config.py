"""The one configuration: `params.yaml` + a model preset, typed and validated once, at load.

An unknown key, preset, prompt style or phase is an error that names the valid ones. Every stage takes the
resolved `PipelineConfig`; `to_dict()` is what gets written next to the artifacts a stage produces.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from llava_core.prompts import check_style

RESOURCES = Path(__file__).resolve().parent / "resources"
PHASES = ("phase1", "phase2")
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the valid choices."""


def _from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and recursing into nested dataclasses."""
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and value is not None:
            value = _from_dict(hint, value, f"{where}.{key}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required keys
        raise ConfigError(f"{where}: {e}") from None


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Workspace:
    """Where each stage writes, relative to `root` (itself relative to the params file's folder)."""

    root: str = "."
    raw: str = "data/raw"
    jsonl: str = "data/jsonl"
    hdf5: str = "data/hdf5"
    checkpoints: str = "checkpoints"
    models: str = "models"
    reports: str = "reports"

    def path(self, name: str) -> Path:
        return Path(self.root) / getattr(self, name)


@dataclass
class SourceConfig:
    kind: str
    generator: str | None = None
    location: str | None = None
    options: dict = field(default_factory=dict)  # generator options, or the kind's transfer settings
    revision: str | None = None  # hf: the pinned commit sha
    sha256: str | None = None  # http: the file's checksum
    patterns: list[str] = field(default_factory=list)  # hf, s3: glob patterns of the files to fetch
    extract: bool = False  # extract the archives that arrive (zip, tar, tar.gz), then remove them

    def validate(self, name: str) -> None:
        from llava_core.sources import SOURCE_KINDS, validate_source

        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"sources.{name}.kind: unknown kind {self.kind!r}; valid: {sorted(SOURCE_KINDS)}")
        try:
            validate_source(self)
        except ValueError as e:
            raise ConfigError(f"sources.{name}: {e}") from None


@dataclass
class DatasetConfig:
    """One conversion: a file of a downloaded source, a converter, and the phase its records train."""

    source: str
    file: str
    converter: str
    phase: str
    image_prefix: str | None = None  # prepended to image paths; default "<source>/"
    options: dict = field(default_factory=dict)  # converter options (llava_core.converters: CONVERTERS)


@dataclass
class Hdf5PhaseConfig:
    prompt_style: str
    max_sequence_length: int
    shard_size: int = 2000  # examples per output file
    min_image_size: int = 8  # shorter side in pixels; smaller images are rejected and counted
    num_workers: int = 1  # writer processes; the output is byte-identical for any number
    max_discarded_fraction: float = 0.05  # validation gate: at most this share of the records may be rejected


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the language model's attention projections; the base LM weights stay frozen."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


RESUME_MODES = ("auto", "never")


@dataclass
class TrainPhaseConfig:
    epochs: float
    global_batch_size: int
    micro_batch_size: int
    learning_rate: float
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    freeze: list[str] = field(default_factory=list)
    mixed_precision: str = "no"
    accelerate_config: str = "configs/accelerate/cpu.yaml"
    log_every: int = 10
    num_workers: int = 0
    save_every: int = 0  # optimizer steps between resumable checkpoints; 0: none before the end
    keep_last: int = 2  # resumable checkpoints kept while the phase runs (removed when it completes)
    resume: str = "auto"  # auto: continue a partial run of the same config (a changed one is an error); never
    gradient_checkpointing: bool = False
    group_by_modality_length: bool = False  # image and text-only records in separate, length-grouped batches
    lora: LoraConfig | None = None  # LoRA on the LM (merged into the saved weights at the end)
    tensorboard: bool = True  # event files in <checkpoint>/tensorboard/
    peak_tflops: float | None = None  # per-device peak for the MFU estimate; None: known GPUs only

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = _from_dict(LoraConfig, self.lora, "train.lora")


@dataclass
class ModelConfig:
    """A vision tower, a language model and a projector; each tower from a pretrained folder or a config."""

    vision_pretrained: str | None = None
    vision_config: dict | None = None
    text_pretrained: str | None = None
    text_config: dict | None = None
    tokenizer: str = ""
    projector: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    image_size: int = 336
    init_seed: int = 0


@dataclass
class Preset:
    model: ModelConfig
    hdf5: dict[str, Hdf5PhaseConfig]
    train: dict[str, TrainPhaseConfig]


# The evaluation prompt suffixes of REFERENCE.md section 8, by the names `eval.suffixes` and questions use.
PROMPT_SUFFIXES: dict[str, str] = {
    "short_answer": "Answer the question using a single word or phrase.",
    "multiple_choice": "Answer with the option's letter from the given choices directly.",
    "none": "",
}


@dataclass
class JudgeConfig:
    """A judge model behind an OpenAI-compatible endpoint (POST {base_url}/chat/completions), LLaVA-Bench style."""

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"  # the variable holding the key; null for a keyless local server
    categories: list[str] = field(default_factory=list)  # question categories to review; empty: all
    temperature: float = 0.2
    max_tokens: int = 1024
    timeout_s: float = 60.0
    max_retries: int = 2  # extra attempts after a connection error, 429 or 5xx
    retry_wait_s: float = 2.0


@dataclass
class EvalConfig:
    questions: str  # relative to the raw folder
    image_folder: str  # relative to the raw folder
    batch_size: int = 32
    max_new_tokens: int = 16
    prompt_style: str = "vicuna_v1"
    prompt_suffix: str = "Answer the question using a single word or phrase."  # categories not in `suffixes`
    metrics: dict[str, str] = field(default_factory=dict)  # category -> metric name
    default_metric: str = "exact_match"
    suffixes: dict[str, str] = field(default_factory=dict)  # category -> a PROMPT_SUFFIXES name
    judge: JudgeConfig | None = None  # optional judge review of the answers

    def __post_init__(self) -> None:
        if isinstance(self.judge, dict):
            self.judge = _from_dict(JudgeConfig, self.judge, "eval.judge")


@dataclass
class PublishConfig:
    """Optional upload of converted models to S3 (credentials from the environment, as boto3 finds them)."""

    bucket: str
    prefix: str = "llava-pipeline"
    endpoint_url: str | None = None  # e.g. a MinIO or moto server; None: AWS
    region: str | None = None
    models: list[str] = field(default_factory=lambda: ["hf"])  # folders under models/: hf, llava


# What the recipe fixes per phase (REFERENCE.md section 2); presets add only numbers and paths.
RECIPE_FREEZE = {"phase1": ["^image_model", "^text_model"], "phase2": ["^image_model"]}
RECIPE_STYLE = {"phase1": "plain", "phase2": "vicuna_v1"}


def _preset(model: dict, msl: dict[str, int], train: dict[str, dict], **train_common) -> dict:
    return {
        "model": model,
        "hdf5": {p: {"prompt_style": RECIPE_STYLE[p], "max_sequence_length": msl[p]} for p in PHASES},
        "train": {p: {**train_common, **train[p], "freeze": RECIPE_FREEZE[p]} for p in PHASES},
    }


def _preset_tiny() -> dict:
    """CPU-sized: a 32 px CLIP tower and a 4-layer Llama built from configs, the tokenizer shipped here."""
    vision = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 4,
        "hidden_act": "quick_gelu",
        "projection_dim": 64,
    }
    text = {
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        # Llama's 0.02 suits hidden sizes in the thousands; at 128 the attention logits start near zero and the
        # question-conditioned lookup of the yes/no questions stays at chance for hundreds of steps
        # (README "Known limits" has the measurements).
        "initializer_range": 0.08,
    }
    model = {
        "vision_config": vision,
        "text_config": text,
        "tokenizer": str(RESOURCES / "tiny_tokenizer"),
        "image_size": 32,
    }
    batch = {"global_batch_size": 32, "micro_batch_size": 32}
    return _preset(
        model,
        {"phase1": 112, "phase2": 288},
        {
            "phase1": {"epochs": 1, "learning_rate": 1e-3, **batch},
            "phase2": {"epochs": 4, "learning_rate": 3e-3, **batch},
        },
    )


def _preset_llava15(size: str) -> dict:
    """LLaVA-1.5 recipe numbers (REFERENCE.md section 2): CLIP ViT-L/14-336 + Vicuna-v1.5, bf16, 8 GPUs."""
    model = {
        "vision_pretrained": "openai/clip-vit-large-patch14-336",
        "text_pretrained": f"lmsys/vicuna-{size}-v1.5",
        "tokenizer": f"lmsys/vicuna-{size}-v1.5",
        "image_size": 336,
    }
    return _preset(
        model,
        {"phase1": 2048, "phase2": 2048},
        {
            "phase1": {"epochs": 1, "global_batch_size": 256, "micro_batch_size": 32, "learning_rate": 1e-3},
            "phase2": {"epochs": 1, "global_batch_size": 128, "micro_batch_size": 16, "learning_rate": 2e-5},
        },
        mixed_precision="bf16",
        accelerate_config="configs/accelerate/multi_gpu.yaml",
    )


PRESETS = {
    "tiny": _preset_tiny,
    "llava-v1.5-7b": lambda: _preset_llava15("7b"),
    "llava-v1.5-13b": lambda: _preset_llava15("13b"),
}


@dataclass
class PipelineConfig:
    preset: str
    model: ModelConfig
    workspace: Workspace
    sources: dict[str, SourceConfig]
    datasets: dict[str, DatasetConfig]
    hdf5: dict[str, Hdf5PhaseConfig]
    train: dict[str, TrainPhaseConfig]
    eval: EvalConfig
    seed: int = 0
    base_dir: Path = Path(".")
    publish: PublishConfig | None = None

    # --- paths -------------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        p = self.workspace.path(name)
        return p if p.is_absolute() else (self.base_dir / p)

    def raw_dir(self, source: str) -> Path:
        return self.path("raw") / source

    def jsonl_path(self, dataset: str) -> Path:
        return self.path("jsonl") / f"{dataset}.jsonl"

    def hdf5_dir(self, phase: str) -> Path:
        return self.path("hdf5") / phase

    def checkpoint_dir(self, phase: str) -> Path:
        return self.path("checkpoints") / phase

    @property
    def image_root(self) -> Path:
        return self.path("raw")

    def datasets_for(self, phase: str) -> list[str]:
        return [n for n, d in self.datasets.items() if d.phase == phase]

    def resolve_file(self, p: str) -> str:
        """A relative path in the config (accelerate config, tokenizer folder) resolves against base_dir."""
        path = Path(p)
        if path.is_absolute() or not (self.base_dir / path).exists():
            return p
        return str(self.base_dir / path)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["base_dir"] = str(self.base_dir)
        return d

    def stage_view(self, *keys: str) -> dict:
        """The part of the resolved config one stage depends on (written next to its artifacts)."""
        d = self.to_dict()
        return {k: d[k] for k in ("preset", "seed", *keys)}

    # --- validation ----------------------------------------------------------------------------------
    def validate(self) -> None:
        for group in ("sources", "datasets"):
            for name in getattr(self, group):
                if not NAME_RE.fullmatch(name):
                    raise ConfigError(
                        f"{group}.{name}: names are Dagster asset keys and DVC stage names; "
                        f"use letters, digits and underscores"
                    )
        for name, src in self.sources.items():
            src.validate(name)
        from llava_core.convert import CONVERTERS

        for name, ds in self.datasets.items():
            if ds.source not in self.sources:
                raise ConfigError(
                    f"datasets.{name}.source: unknown source {ds.source!r}; valid: {sorted(self.sources)}"
                )
            if ds.converter not in CONVERTERS:
                raise ConfigError(
                    f"datasets.{name}.converter: unknown converter {ds.converter!r}; valid: {sorted(CONVERTERS)}"
                )
            bad = sorted(set(ds.options) - set(CONVERTERS[ds.converter].options))
            if bad:
                raise ConfigError(
                    f"datasets.{name}.options: unknown key(s) {bad} for converter {ds.converter!r}; "
                    f"valid: {sorted(CONVERTERS[ds.converter].options)}"
                )
            if ds.phase not in PHASES:
                raise ConfigError(f"datasets.{name}.phase: {ds.phase!r}; valid: {list(PHASES)}")
        for group in ("hdf5", "train"):
            got = set(getattr(self, group))
            if got != set(PHASES):
                raise ConfigError(f"{group}: needs exactly the phases {list(PHASES)}, got {sorted(got)}")
        for phase, h in self.hdf5.items():
            try:
                check_style(h.prompt_style)
            except ValueError as e:
                raise ConfigError(f"hdf5.{phase}.prompt_style: {e}") from None
            if h.max_sequence_length <= 0 or h.shard_size <= 0 or h.num_workers <= 0:
                raise ConfigError(f"hdf5.{phase}: max_sequence_length, shard_size and num_workers must be positive")
            if not 0.0 <= h.max_discarded_fraction <= 1.0:
                raise ConfigError(
                    f"hdf5.{phase}.max_discarded_fraction: {h.max_discarded_fraction} is not between 0 and 1"
                )
        for phase, t in self.train.items():
            if t.global_batch_size % t.micro_batch_size:
                raise ConfigError(
                    f"train.{phase}: global_batch_size {t.global_batch_size} is not a multiple of "
                    f"micro_batch_size {t.micro_batch_size}"
                )
            if t.mixed_precision not in ("no", "bf16", "fp16"):
                raise ConfigError(f"train.{phase}.mixed_precision: {t.mixed_precision!r}; valid: no, bf16, fp16")
            if t.resume not in RESUME_MODES:
                raise ConfigError(f"train.{phase}.resume: {t.resume!r}; valid: {list(RESUME_MODES)}")
            if t.save_every < 0 or t.keep_last < 1 or t.log_every < 1:
                raise ConfigError(
                    f"train.{phase}: save_every must be >= 0, keep_last >= 1 and log_every >= 1 "
                    f"(got {t.save_every}, {t.keep_last}, {t.log_every})"
                )
            if t.lora is not None and (t.lora.r < 1 or not t.lora.target_modules or not 0 <= t.lora.dropout < 1):
                raise ConfigError(f"train.{phase}.lora: r must be >= 1, target_modules non-empty, 0 <= dropout < 1")
            if t.peak_tflops is not None and t.peak_tflops <= 0:
                raise ConfigError(f"train.{phase}.peak_tflops must be positive")
        from llava_core.metrics import METRICS

        for cat, metric in {**self.eval.metrics, "<default>": self.eval.default_metric}.items():
            if metric not in METRICS:
                raise ConfigError(f"eval.metrics.{cat}: unknown metric {metric!r}; valid: {sorted(METRICS)}")
        for cat, name in self.eval.suffixes.items():
            if name not in PROMPT_SUFFIXES:
                raise ConfigError(f"eval.suffixes.{cat}: unknown suffix {name!r}; valid: {sorted(PROMPT_SUFFIXES)}")
        if self.publish is not None:
            bad = sorted(set(self.publish.models) - {"hf", "llava"})
            if bad:
                raise ConfigError(f"publish.models: unknown model folder(s) {bad}; valid: ['hf', 'llava']")
        check_style(self.eval.prompt_style)
        m = self.model
        if (m.vision_pretrained is None) == (m.vision_config is None):
            raise ConfigError("model: set exactly one of vision_pretrained and vision_config")
        if (m.text_pretrained is None) == (m.text_config is None):
            raise ConfigError("model: set exactly one of text_pretrained and text_config")


TOP_KEYS = ("preset", "seed", "workspace", "model", "sources", "datasets", "hdf5", "train", "eval", "publish")


def load_config(params_path: str | Path, overrides: dict | None = None) -> PipelineConfig:
    """Read params.yaml, merge it over its preset and validate everything once."""
    params_path = Path(params_path).resolve()
    if not params_path.exists():
        raise ConfigError(f"params file not found: {params_path}")
    try:
        raw = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{params_path}: not UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{params_path}: not valid YAML ({e})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{params_path}: expected a mapping of settings at the top level, got {type(raw).__name__}")
    raw = _merge(raw, overrides or {})
    return config_from_dict(raw, base_dir=params_path.parent)


def config_from_dict(raw: dict, base_dir: Path) -> PipelineConfig:
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"params: unknown key(s) {unknown}; valid: {list(TOP_KEYS)}")
    preset_name = raw.get("preset", "tiny")
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown preset {preset_name!r}; valid: {sorted(PRESETS)}")
    preset = PRESETS[preset_name]()
    merged = {
        "model": _merge(preset["model"], raw.get("model", {})),
        "hdf5": _merge(preset["hdf5"], raw.get("hdf5", {})),
        "train": _merge(preset["train"], raw.get("train", {})),
    }
    if "eval" not in raw:
        raise ConfigError("params: missing the 'eval' section")
    cfg = PipelineConfig(
        preset=preset_name,
        seed=int(raw.get("seed", 0)),
        model=_from_dict(ModelConfig, merged["model"], "model"),
        workspace=_from_dict(Workspace, raw.get("workspace", {}), "workspace"),
        sources={k: _from_dict(SourceConfig, v, f"sources.{k}") for k, v in (raw.get("sources") or {}).items()},
        datasets={k: _from_dict(DatasetConfig, v, f"datasets.{k}") for k, v in (raw.get("datasets") or {}).items()},
        hdf5={k: _from_dict(Hdf5PhaseConfig, v, f"hdf5.{k}") for k, v in merged["hdf5"].items()},
        train={k: _from_dict(TrainPhaseConfig, v, f"train.{k}") for k, v in merged["train"].items()},
        eval=_from_dict(EvalConfig, raw["eval"], "eval"),
        base_dir=base_dir,
        publish=_from_dict(PublishConfig, raw["publish"], "publish") if raw.get("publish") else None,
    )
    cfg.validate()
    return cfg


class DiskFullError(OSError):
    """The disk filled up while a stage wrote its temporary output; the final path was left as it was."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged(final: Path, *tmps: Path) -> Iterator[None]:
    """Around the writing of `final`'s new version into the temporary `tmps` (files or folders).

    On any failure the temporaries are removed (they are not resumable; a killed run's are removed by the next
    run) and `final` keeps whatever version it had. A full disk (ENOSPC, EDQUOT) becomes a `DiskFullError`
    that names the path being written, not a bare "[Errno 28] No space left on device".
    """
    try:
        yield
    except BaseException as e:
        for tmp in tmps:
            _remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                errno.ENOSPC,
                f"no space left on device while writing {tmps[0] if tmps else final}: {final} was not changed "
                f"(an earlier version there is kept); free some space and run the stage again ({e})",
            ) from e
        raise


def json_text(data: Any) -> str:
    """The JSON text every report and metadata file is written as (stable: sorted keys)."""
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary name and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with staged(path, tmp):
        tmp.write_text(json_text(data))
    tmp.replace(path)


def partial_dir(out: Path) -> Path:
    """An empty sibling `.<name>.partial` folder to build `out` in (a leftover from a killed run is removed).

    A previous version that a run killed between `replace_dir`'s two renames left set aside (`.<name>.old`,
    with nothing at `out`) is first put back, so a kill never loses the earlier artifact.
    """
    old = out.with_name(f".{out.name}.old")
    if old.is_dir() and not out.exists():
        old.rename(out)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a completed folder into place; the previous version is set aside and removed only afterwards."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
