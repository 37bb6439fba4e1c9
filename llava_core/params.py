"""Reading params.yaml: merge its sections over the preset, validate them against the schema (`llava_core.config`)
once, and report every problem of the file at once, each with its key path, before any stage runs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from llava_core.config import (
    ConfigError,
    DatasetConfig,
    EvalCategoryConfig,
    EvalConfig,
    ExportConfig,
    Hdf5PhaseConfig,
    JudgeConfig,
    LoraConfig,
    ModelConfig,
    PipelineConfig,
    PublishConfig,
    RegistryConfig,
    SlurmConfig,
    SourceConfig,
    TrainPhaseConfig,
    Workspace,
)
from llava_core.presets import PRESETS

TOP_KEYS = tuple(k for k in PipelineConfig.model_fields if k != "base_dir")
PRESET_SECTIONS = ("model", "hdf5", "train")


# --- loading ---------------------------------------------------------------------------------------------------


def merge(base: dict, override: dict | None) -> dict:
    """`override` over `base`, recursively for mappings."""
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _num_patches(model: Any) -> int | None:
    vc = model.get("vision_config") if isinstance(model, dict) else None
    try:
        return (int(vc["image_size"]) // int(vc["patch_size"])) ** 2
    except (TypeError, KeyError, ValueError, ZeroDivisionError):
        return None


def _unwrap(t: Any) -> Any:
    """X from X | None and Annotated[X, ...]."""
    while get_origin(t) in (Union, UnionType, Annotated):
        t = next(a for a in get_args(t) if a is not type(None))
    return t


def _fields_at(loc: tuple) -> list[str]:
    """The valid keys of the mapping at `loc` in the schema (for an unknown-key message)."""
    t: Any = PipelineConfig
    for part in loc:
        t = _unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel) and part in t.model_fields:
            t = t.model_fields[part].annotation
        elif get_origin(t) is dict:
            t = get_args(t)[1]
        else:
            return []
    t = _unwrap(t)
    if isinstance(t, type) and issubclass(t, BaseModel):
        return [k for k, f in t.model_fields.items() if not f.exclude]
    return []


def _errors(e: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in e.errors(include_url=False):
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            where = ".".join(str(p) for p in loc[:-1])
            msg = f"unknown key {loc[-1]!r}; valid: {', '.join(_fields_at(loc[:-1]))}"
        elif err["type"] == "missing":
            msg = "missing (required)"
        elif err["type"] in ("value_error", "assertion_error"):
            msg = str(err["msg"]).removeprefix("Value error, ")
            head, _, rest = msg.partition(": ")
            if rest and head in _fields_at(loc):  # "options: unknown key ..." -> at sources.<name>.options
                where, msg = f"{where}.{head}", rest
        else:
            msg = (
                f"{err['msg']} (got {err['input']!r})"
                if "input" in err and not isinstance(err["input"], dict)
                else err["msg"]
            )
        out.append((where or "params", msg))
    return out


def config_from_dict(raw: dict, base_dir: Path, source: str | None = None) -> PipelineConfig:
    """Merge the sections over their preset and validate everything; `ConfigError` lists every problem."""
    errors: list[tuple[str, str]] = []
    raw = dict(raw)
    name = raw.get("preset", "tiny")
    if name not in PRESETS:
        errors.append(("preset", f"unknown preset {name!r}; valid: {', '.join(PRESETS)}"))
        preset: dict = {k: {} for k in PRESET_SECTIONS}
    else:
        preset = PRESETS[name]()
    for section in PRESET_SECTIONS:
        value = raw.get(section)
        if value is not None and not isinstance(value, dict):
            errors.append((section, f"expected a mapping, got {type(value).__name__}"))
            raw.pop(section)
        raw[section] = merge(preset[section], raw.get(section))
    if raw.get("sources") is None:
        raw["sources"] = {}
    if raw.get("datasets") is None:
        raw["datasets"] = {}
    sources = list(raw["sources"]) if isinstance(raw["sources"], dict) else []
    datasets = raw["datasets"] if isinstance(raw["datasets"], dict) else {}
    phases = {n: d.get("phase") for n, d in datasets.items() if isinstance(d, dict)}  # eval.categories.<c>.dataset
    context = {"sources": sources, "base_dir": Path(base_dir), "num_patches": _num_patches(raw.get("model"))}
    context["dataset_phases"] = phases
    try:
        cfg = PipelineConfig.model_validate({**raw, "base_dir": Path(base_dir)}, context=context)
    except ValidationError as e:
        found = _errors(e)
        if name not in PRESETS:  # the preset's own keys are missing because the preset is: said once, above
            found = [(w, m) for w, m in found if not (w.split(".")[0] in PRESET_SECTIONS and m == "missing (required)")]
        errors += found
        cfg = None
    if errors:
        raise ConfigError(errors, source)
    return cfg


def load_config(params_path: str | Path, overrides: dict | None = None) -> PipelineConfig:
    """Read params.yaml, merge it over its preset and validate everything once."""
    params_path = Path(params_path).resolve()
    if not params_path.exists():
        raise ConfigError([("", f"params file not found: {params_path}")])
    try:
        raw = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError([("", f"not UTF-8 text ({e})")], str(params_path)) from None
    except yaml.YAMLError as e:
        raise ConfigError([("", f"not valid YAML ({e})")], str(params_path)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            [("", f"expected a mapping of settings at the top level, got {type(raw).__name__}")], str(params_path)
        )
    return config_from_dict(merge(raw, overrides), params_path.parent, str(params_path))


# --- the params reference (docs/params.md) ----------------------------------------------------------------------


def _bounds(metadata) -> str:
    """` (> 0, <= 1)` from pydantic/annotated-types constraints (also those inside a `Field(...)`)."""
    flat = [c for m in metadata for c in (getattr(m, "metadata", None) or [m])]
    ops = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "at least"))
    found = [f"{op} {getattr(c, attr)}" for c in flat for attr, op in ops if getattr(c, attr, None) is not None]
    return f" ({', '.join(found)})" if found else ""


def _type_name(t: Any) -> str:
    """A readable type for the params reference, without `|` (the table's separator)."""
    origin, args = get_origin(t), get_args(t)
    if t is type(None):
        return "null"
    if origin in (Union, UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Annotated:
        return _type_name(args[0]) + _bounds(args[1:])
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return f"section ({t.__name__})"
    return getattr(t, "__name__", str(t))


def params_reference() -> str:
    """Markdown: every key of every section with its type, default and meaning (generated from the schema)."""
    sections = [
        ("top level", PipelineConfig),
        ("workspace", Workspace),
        ("sources.<name>", SourceConfig),
        ("datasets.<name>", DatasetConfig),
        ("model", ModelConfig),
        ("hdf5.<phase>", Hdf5PhaseConfig),
        ("train.<phase>", TrainPhaseConfig),
        ("train.<phase>.lora", LoraConfig),
        ("train.<phase>.slurm", SlurmConfig),
        ("eval", EvalConfig),
        ("eval.categories.<category>", EvalCategoryConfig),
        ("eval.judge", JudgeConfig),
        ("export", ExportConfig),
        ("publish", PublishConfig),
        ("registry", RegistryConfig),
    ]
    lines = [
        "# params.yaml reference",
        "",
        "Generated from the schema in `llava_core/config/` (`llava-pipeline params > docs/params.md`; a test",
        "keeps it current). `model`, `hdf5` and `train` are merged over the preset's values (`preset`); every",
        "other section is read as written.",
    ]
    for title, model in sections:
        lines += [
            "",
            f"## `{title}`",
            "",
            (model.__doc__ or "").strip(),
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for key, field in model.model_fields.items():
            if field.exclude:
                continue
            kind = _type_name(field.annotation) + _bounds(field.metadata)
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = "(section defaults)" if isinstance(value, BaseModel) else f"`{value!r}`"
            lines.append(f"| `{key}` | {kind} | {default} | {field.description or ''} |")
    return "\n".join(lines) + "\n"
