"""Stage 5a, training <-> the original LLaVA repository's layout: `models/llava/` holds `image_model/` (the CLIP
vision tower + preprocessor_config.json) and `text_model_llava/` (LLM + `model.mm_projector.0/2` weights,
tokenizer, a `model_type: llava` config with the `mm_*` keys), what LLaVA's own `load_pretrained_model` and
eval scripts read, and beside it `text_model/`, the same files under the name Cerebras' HF-to-CS LLaVA converter
reads with `image_model/` (docs/formats.md); and any such checkpoint back to the training format.

Weights are always sharded safetensors with `model.safetensors.index.json` here (one shard when small): the
Cerebras converter takes a folder's `*.index.json` or `pytorch_model.bin`, never a lone `model.safetensors`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_core.artifacts import EXPORT_INFO, IMPORT_INFO, TRAIN_SUMMARY
from llava_core.atomic import partial_dir, replace_dir, staged, write_json_atomic
from llava_core.config import PipelineConfig
from llava_core.data.prompts import check_style
from llava_core.model.geometry import vision_config_of
from llava_core.model.llava import LlavaModel, load_model, model_from_config_dict, save_model
from llava_core.model.weights import (
    ImportResult,
    clip_image_processor,
    finished_checkpoint,
    image_start_for,
    link_or_copy,
    load_exact,
    load_weights,
    remap,
    reverse_map,
    save_weights,
    vocab_rows,
    with_rope_theta,
    write_classic_tokenizer,
)

LLAVA_IMAGE_DIR = "image_model"
LLAVA_TEXT_DIR = "text_model_llava"  # LLaVA's scripts want "llava" in the model path
CEREBRAS_TEXT_DIR = "text_model"  # what Cerebras' converter reads beside image_model/

LLAVA_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("image_model.", f"{LLAVA_IMAGE_DIR}/vision_model."),
    ("projector.0.", f"{LLAVA_TEXT_DIR}/model.mm_projector.0."),
    ("projector.2.", f"{LLAVA_TEXT_DIR}/model.mm_projector.2."),
    ("text_model.model.", f"{LLAVA_TEXT_DIR}/model."),
    ("text_model.lm_head.", f"{LLAVA_TEXT_DIR}/lm_head."),
)
# the rows indexed by token id, in the training layout


LLAVA_ONLY_CONFIG_PREFIXES = ("mm_", "tune_", "freeze_", "unfreeze_", "tokenizer_")


LLAVA_ONLY_CONFIG_KEYS = {"image_aspect_ratio", "image_grid_pinpoints", "use_mm_proj", "architectures", "model_type"}


@dataclass
class LlavaExportResult:
    path: Path
    parameters: int
    image_model: Path
    text_model: Path
    cerebras_text_model: Path


def to_llava_state_dict(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Training state -> {"image_model": {...}, "text_model_llava": {...}} under the original repo's keys."""
    out: dict[str, dict[str, torch.Tensor]] = {LLAVA_IMAGE_DIR: {}, LLAVA_TEXT_DIR: {}}
    for key, value in remap(state, LLAVA_KEY_MAP).items():
        folder, name = key.split("/", 1)
        out[folder][name] = value
    return out


def from_llava_state_dict(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of `to_llava_state_dict` (the `mm_projector` keys win over the `model.` prefix they share)."""
    flat = {f"{folder}/{k}": v for folder, state in parts.items() for k, v in state.items()}
    return remap(flat, reverse_map(LLAVA_KEY_MAP))


def llava_text_config(model: LlavaModel, vision_tower: str) -> dict:
    """`text_model_llava/config.json`: the language model's config plus the LLaVA `mm_*` keys (section 7)."""
    d = model.text_model.config.to_dict()
    d.update(
        {
            "model_type": "llava",
            "architectures": ["LlavaLlamaForCausalLM"],
            "mm_projector_type": "mlp2x_gelu",
            "mm_hidden_size": model.image_model.config.hidden_size,
            "mm_vision_select_layer": model.vision_feature_layer,
            "mm_vision_select_feature": "patch",
            "mm_vision_tower": vision_tower,
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "image_aspect_ratio": "pad",
            "use_mm_proj": True,
        }
    )
    return with_rope_theta(d)


def write_llava_original(
    model: LlavaModel, tok, folder: Path, vision_tower: str, max_shard_bytes: int, tokenizer_dir: Path | None = None
) -> None:
    """Write `folder/image_model/`, `folder/text_model_llava/` and `folder/text_model/` (the caller makes it atomic).

    `text_model/` holds the files of `text_model_llava/` as hard links (a copy where links are impossible).
    """
    parts = to_llava_state_dict(model.state_dict())
    image_dir, text_dir = folder / LLAVA_IMAGE_DIR, folder / LLAVA_TEXT_DIR
    vc = copy.deepcopy(model.image_model.config)
    vc.architectures = ["CLIPVisionModel"]
    vc.save_pretrained(image_dir)
    save_weights(parts[LLAVA_IMAGE_DIR], image_dir, max_shard_bytes, always_index=True)
    clip_image_processor(model.image_model.config.image_size).save_pretrained(image_dir)
    save_weights(parts[LLAVA_TEXT_DIR], text_dir, max_shard_bytes, always_index=True)
    (text_dir / "config.json").write_text(json.dumps(llava_text_config(model, vision_tower), indent=2, default=str))
    write_classic_tokenizer(tok, text_dir, source=tokenizer_dir)
    cerebras_dir = folder / CEREBRAS_TEXT_DIR
    cerebras_dir.mkdir()
    for f in sorted(text_dir.iterdir()):
        link_or_copy(f, cerebras_dir / f.name)


def export_llava(cfg: PipelineConfig, phase: str = "phase2") -> LlavaExportResult:
    """Convert the finished `checkpoints/<phase>/` to the original LLaVA layout in `models/llava/` (atomic).

    `mm_vision_tower` is `image_model`, a path relative to `models/llava/`: LLaVA's `build_vision_tower` takes
    it when `os.path.exists` finds it and `CLIPVisionModel.from_pretrained` loads it, both from the working
    directory, so LLaVA's scripts run from inside the export folder (`cd models/llava`, then
    `--model-path text_model_llava`, a path containing "llava"). An absolute path would tie the export, and its
    DVC hash, to one checkout; the folder moves or is downloaded anywhere as it is (docs/formats.md).
    """
    from transformers import AutoTokenizer

    ckpt = finished_checkpoint(cfg, phase)
    model = load_model(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    out = cfg.path("models") / "llava"
    tmp = partial_dir(out)
    with staged(out, tmp):
        write_llava_original(model, tok, tmp, LLAVA_IMAGE_DIR, cfg.export.max_shard_bytes, ckpt / "tokenizer")
        write_json_atomic(tmp / EXPORT_INFO, {"source_checkpoint": cfg.rel(ckpt), "phase": phase, "format": "llava"})
    replace_dir(tmp, out)
    parameters = sum(p.numel() for p in model.parameters())
    return LlavaExportResult(out, parameters, out / LLAVA_IMAGE_DIR, out / LLAVA_TEXT_DIR, out / CEREBRAS_TEXT_DIR)


def _llava_folders(folder: Path) -> tuple[Path, dict]:
    """(text folder, its config) for `folder` = the export root (holding text_model_llava/) or the text folder."""
    folder = Path(folder)
    text_dir = folder / LLAVA_TEXT_DIR if (folder / LLAVA_TEXT_DIR / "config.json").is_file() else folder
    if not (text_dir / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no {LLAVA_TEXT_DIR}/config.json nor config.json")
    config = json.loads((text_dir / "config.json").read_text())
    if "mm_vision_tower" not in config:
        raise ValueError(f"{text_dir}/config.json has no mm_vision_tower: not an original-LLaVA checkpoint")
    return text_dir, config


def _vision_tower_dir(text_dir: Path, tower: str) -> Path | None:
    """The local folder `mm_vision_tower` names: relative to the export folder (ours: `image_model`), as written
    (absolute, or from the working directory as LLaVA reads it), relative to the text folder, or the sibling
    image_model."""
    for cand in (text_dir.parent / tower, Path(tower), text_dir / tower, text_dir.parent / LLAVA_IMAGE_DIR):
        if (cand / "config.json").is_file():
            return cand
    return None


def load_llava_original(folder: Path) -> tuple[LlavaModel, object]:
    """An original-LLaVA checkpoint (our `models/llava/` or the repo's layout) -> (training model, tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer, CLIPVisionModel

    text_dir, config = _llava_folders(folder)
    problems = []
    for key, want in (
        ("mm_projector_type", "mlp2x_gelu"),
        ("mm_vision_select_feature", "patch"),
        ("mm_use_im_start_end", False),
    ):
        if config.get(key, want) != want:
            problems.append(f"{key} {config.get(key)!r} (supported: {want!r})")
    if problems:
        raise ValueError(f"{text_dir}: cannot convert: {'; '.join(problems)}")
    tower = config["mm_vision_tower"]
    image_dir = _vision_tower_dir(text_dir, tower)
    if image_dir is not None:
        vision_config = vision_config_of(AutoConfig.from_pretrained(image_dir))
        raw = load_weights(image_dir)
        image_state = {k: v for k, v in raw.items() if k.startswith("vision_model.")}
        if not image_state:  # a CLIPVisionModel saved by transformers 5.x: no prefix
            image_state = {f"vision_model.{k}": v for k, v in raw.items()}
    else:  # a hub id, as in the released LLaVA-1.5 configs ("openai/clip-vit-large-patch14-336")
        tower_model = CLIPVisionModel.from_pretrained(tower)
        vision_config = tower_model.config
        image_state = {f"vision_model.{k}": v for k, v in tower_model.state_dict().items()}
    text_config = {
        k: v
        for k, v in config.items()
        if k not in LLAVA_ONLY_CONFIG_KEYS and not k.startswith(LLAVA_ONLY_CONFIG_PREFIXES)
    }
    # A copy of the tower saved inside the text folder is ignored, as the LLaVA repo ignores it (its tower is
    # delay-loaded from mm_vision_tower).
    text_state = {k: v for k, v in load_weights(text_dir).items() if not k.startswith("model.vision_tower.")}
    state = from_llava_state_dict({LLAVA_IMAGE_DIR: image_state, LLAVA_TEXT_DIR: text_state})
    text_config["vocab_size"] = vocab_rows(state)
    model = model_from_config_dict(
        {
            "vision_config": vision_config.to_dict(),
            "text_config": {**text_config, "model_type": "llama"},
            "projector": "mlp2x_gelu",
            "vision_feature_layer": int(config.get("mm_vision_select_layer", -2)),
        }
    )
    load_exact(model, state, text_dir)
    tok = AutoTokenizer.from_pretrained(text_dir)
    if tok.pad_token_id is None and tok.unk_token_id is not None:
        tok.pad_token = tok.unk_token
    return model.eval(), tok


def import_llava(folder: Path, out: Path, prompt_style: str = "vicuna_v1") -> ImportResult:
    """An original-LLaVA checkpoint -> a training-format checkpoint folder in `out` (atomic)."""
    check_style(prompt_style)
    folder, out = Path(folder), Path(out)
    model, tok = load_llava_original(folder)
    tmp = partial_dir(out)
    with staged(out, tmp):
        save_model(model, tmp)
        tok.save_pretrained(tmp / "tokenizer")
        write_json_atomic(tmp / IMPORT_INFO, {"source": str(folder), "format": "llava", "prompt_style": prompt_style})
        write_json_atomic(
            tmp / TRAIN_SUMMARY,
            {
                "phase": "imported",
                "steps": 0,
                "source": str(folder),
                "image_patch_start_idx": image_start_for(tok, prompt_style, model.num_patches),
            },
        )
    replace_dir(tmp, out)
    vocab = model.text_model.get_input_embeddings().num_embeddings
    return ImportResult(out, sum(p.numel() for p in model.parameters()), folder, vocab, 0)
