"""Stage 5a, checkpoint conversion between the training format, Hugging Face LLaVA and the original LLaVA repo.

Conversion is pure functions over state dicts driven by key maps (the torchtune way), so every direction is
testable by a round trip:

- training -> Hugging Face (`models/hf/`): `LlavaForConditionalGeneration` + processor (image processor with
  pad-to-square, tokenizer with the `<image>` token, chat template), loadable by transformers alone;
- training -> original LLaVA repository (`models/llava/`, REFERENCE.md section 7): `image_model/` (the CLIP
  vision tower + preprocessor_config.json) and `text_model_llava/` (LLM + `model.mm_projector.0/2` weights,
  tokenizer, a `model_type: llava` config with the `mm_*` keys);
- Hugging Face or original LLaVA -> training format, so existing llava-hf weights can be fine-tuned or evaluated.

Weights are written as safetensors only; `.bin` files of original checkpoints are read with weights_only=True.
When a tokenizer lacks `<image>`, the HF export adds it past the vocabulary and pads the embeddings to a multiple
of 64 (as llava-hf does: 32000 -> 32064); `export_info.json` records the original vocabulary so the import
trims the rows and the token again and the round trip stays bit-identical.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llava_core.config import PipelineConfig, partial_dir, replace_dir, staged, write_json_atomic
from llava_core.images import CLIP_MEAN, CLIP_STD
from llava_core.model import LlavaModel, _vision_config_of, load_model, model_from_config_dict, save_model
from llava_core.prompts import SYSTEM_PROMPTS, check_style, encode_conversation

IMAGE_TOKEN = "<image>"
EXPORT_INFO = "export_info.json"
IMPORT_INFO = "import_info.json"
VOCAB_MULTIPLE = 64  # llava-hf pads its embeddings to a multiple of 64 after adding <image> (32000 -> 32064)

# training-format prefix -> Hugging Face LlavaForConditionalGeneration prefix (transformers 5.x in-memory layout)
HF_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("image_model.", "model.vision_tower."),
    ("projector.0.", "model.multi_modal_projector.linear_1."),
    ("projector.2.", "model.multi_modal_projector.linear_2."),
    ("text_model.model.", "model.language_model."),
    ("text_model.lm_head.", "lm_head."),
)

# training-format prefix -> "<folder>/<key prefix>" of the original LLaVA layout. The vision tower keeps the
# `vision_model.` prefix of a CLIPVisionModel file (what the LLaVA repo's transformers 4.x loads; 5.x reads it too).
LLAVA_IMAGE_DIR = "image_model"
LLAVA_TEXT_DIR = "text_model_llava"
LLAVA_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("image_model.", f"{LLAVA_IMAGE_DIR}/vision_model."),
    ("projector.0.", f"{LLAVA_TEXT_DIR}/model.mm_projector.0."),
    ("projector.2.", f"{LLAVA_TEXT_DIR}/model.mm_projector.2."),
    ("text_model.model.", f"{LLAVA_TEXT_DIR}/model."),
    ("text_model.lm_head.", f"{LLAVA_TEXT_DIR}/lm_head."),
)
# the rows indexed by token id, in the training layout
VOCAB_KEYS = ("text_model.model.embed_tokens.weight", "text_model.lm_head.weight")
# config keys of the original LLaVA `LlavaLlamaForCausalLM` that are not the language model's
LLAVA_ONLY_CONFIG_PREFIXES = ("mm_", "tune_", "freeze_", "unfreeze_", "tokenizer_")
LLAVA_ONLY_CONFIG_KEYS = {"image_aspect_ratio", "image_grid_pinpoints", "use_mm_proj", "architectures", "model_type"}


@dataclass
class ExportResult:
    path: Path
    parameters: int
    image_token_id: int


@dataclass
class LlavaExportResult:
    path: Path
    parameters: int
    image_model: Path
    text_model: Path


@dataclass
class ImportResult:
    path: Path
    parameters: int
    source: Path
    vocab_size: int
    trimmed_rows: int  # embedding rows the export had added (and the import removed again)


@dataclass
class HFConversion:
    """An in-memory HF model with its tokenizer, and what the conversion changed to get the `<image>` token."""

    model: object  # LlavaForConditionalGeneration
    tokenizer: object
    image_token_id: int
    original_vocab_size: int
    added_tokens: list[str] = field(default_factory=list)


# --- pure state-dict functions --------------------------------------------------------------------------------


def _remap(state: dict[str, torch.Tensor], pairs: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    """Rename every key by the longest source prefix that matches it; a key no pair covers is an error."""
    out = {}
    for key, value in state.items():
        matches = [(src, dst) for src, dst in pairs if key.startswith(src)]
        if not matches:
            raise KeyError(f"no mapping for parameter {key!r}; mapped prefixes: {[s for s, _ in pairs]}")
        src, dst = max(matches, key=lambda m: len(m[0]))
        out[dst + key[len(src) :]] = value
    return out


def _reverse(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((dst, src) for src, dst in pairs)


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _remap(state, HF_KEY_MAP)


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _remap(state, _reverse(HF_KEY_MAP))


def to_llava_state_dict(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Training state -> {"image_model": {...}, "text_model_llava": {...}} under the original repo's keys."""
    out: dict[str, dict[str, torch.Tensor]] = {LLAVA_IMAGE_DIR: {}, LLAVA_TEXT_DIR: {}}
    for key, value in _remap(state, LLAVA_KEY_MAP).items():
        folder, name = key.split("/", 1)
        out[folder][name] = value
    return out


def from_llava_state_dict(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of `to_llava_state_dict` (the `mm_projector` keys win over the `model.` prefix they share)."""
    flat = {f"{folder}/{k}": v for folder, state in parts.items() for k, v in state.items()}
    return _remap(flat, _reverse(LLAVA_KEY_MAP))


def vocab_rows(state: dict[str, torch.Tensor]) -> int:
    return state[VOCAB_KEYS[0]].shape[0]


def pad_vocab(state: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Grow the token-indexed rows to `size`; new rows are the mean of the existing ones (as llava-hf does)."""
    out = dict(state)
    for key in VOCAB_KEYS:
        if key in state:
            w = state[key]  # (V, D)
            extra = w.float().mean(0, keepdim=True).to(w.dtype).expand(size - w.shape[0], -1)
            out[key] = torch.cat([w, extra], 0)
    return out


def trim_vocab(state: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Keep the first `size` token-indexed rows (undoes `pad_vocab`)."""
    out = dict(state)
    for key in VOCAB_KEYS:
        if key in state:
            out[key] = state[key][:size].clone()
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --- tokenizer, processor --------------------------------------------------------------------------------------


def image_token_id_of(tok) -> int | None:
    """The id of `<image>` in `tok`, or None when the tokenizer does not know it."""
    tid = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id):
        return None
    return int(tid)


def ensure_image_token(tok) -> tuple[object, int, list[str]]:
    """(tokenizer with `<image>`, its id, tokens added). Adds it as a special token to a copy when missing."""
    from transformers import AddedToken

    tid = image_token_id_of(tok)
    if tid is not None:
        return tok, tid, []
    tok = copy.deepcopy(tok)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tok, int(tok.convert_tokens_to_ids(IMAGE_TOKEN)), [IMAGE_TOKEN]


def drop_added_tokens(tokenizer_dir: Path, keep_below: int) -> list[str]:
    """Remove the added tokens with id >= keep_below from a saved tokenizer folder (undoes `ensure_image_token`).

    Returns the removed tokens. Works on the `tokenizer.json` every 5.x tokenizer saves.
    """
    tj_path = tokenizer_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise FileNotFoundError(f"{tokenizer_dir} has no tokenizer.json: cannot remove the tokens added by the export")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    removed = [t["content"] for t in tj.get("added_tokens", []) if t["id"] >= keep_below]
    tj["added_tokens"] = [t for t in tj.get("added_tokens", []) if t["id"] < keep_below]
    tj_path.write_text(json.dumps(tj, ensure_ascii=False, indent=2), encoding="utf-8")
    cfg_path = tokenizer_dir / "tokenizer_config.json"
    if cfg_path.is_file() and removed:
        tc = json.loads(cfg_path.read_text(encoding="utf-8"))
        for key in [k for k, v in tc.items() if isinstance(v, str) and v in removed]:
            del tc[key]  # e.g. "image_token": "<image>"
        extra = tc.get("extra_special_tokens")
        if isinstance(extra, list):
            tc["extra_special_tokens"] = [t for t in extra if t not in removed]
        elif isinstance(extra, dict):
            tc["extra_special_tokens"] = {k: v for k, v in extra.items() if v not in removed}
        cfg_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2), encoding="utf-8")
    return removed


def vicuna_chat_template(style: str = "vicuna_v1") -> str:
    """Jinja chat template rendering the conversation the way `prompts.encode_conversation` lays it out."""
    system = SYSTEM_PROMPTS[style].replace("'", "\\'")
    return (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '" + system + "' %}{% endif %}"
        "{{ bos_token }}{{ system }}"
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}{{ ' USER: ' if loop.first else 'USER: ' }}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endif %} ASSISTANT:"
        "{% else %}"
        "{% if m['content'] is string %} {{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}"
        "{% endif %}{{ eos_token }}"
        "{% endif %}{% endfor %}"
    )


def clip_image_processor(size: int, cls=None, **extra):
    """The CLIP preprocessing of `images.clip_transform` as a transformers image processor (default CLIP's)."""
    if cls is None:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    return cls(
        do_resize=True,
        size={"shortest_edge": size},
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
        resample=3,  # bicubic
        **extra,
    )


# --- training <-> Hugging Face ---------------------------------------------------------------------------------


def build_hf_model(model: LlavaModel, image_token_id: int, vocab_size: int | None = None):
    """An in-memory `LlavaForConditionalGeneration` with exactly the training model's weights.

    With `vocab_size` above the model's rows, the embeddings and lm_head are padded (`pad_vocab`).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vc, tc = model.image_model.config, model.text_model.config
    state = model.state_dict()
    text_config = tc.to_dict()
    if vocab_size is not None and vocab_size > vocab_rows(state):
        state = pad_vocab(state, vocab_size)
        text_config["vocab_size"] = vocab_size
    config = LlavaConfig(
        vision_config=vc.to_dict(),
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=model.num_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=model.vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
    )
    hf = LlavaForConditionalGeneration(config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(state), strict=False)
    if missing or unexpected:
        raise ValueError(f"HF layout mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf.eval()


def hf_from_training(model: LlavaModel, tok) -> HFConversion:
    """The HF model for a training model and its tokenizer, adding `<image>` (and padded rows) when needed."""
    rows = model.text_model.get_input_embeddings().num_embeddings
    tok, image_token_id, added = ensure_image_token(tok)
    vocab = _round_up(len(tok), VOCAB_MULTIPLE) if image_token_id >= rows else None
    return HFConversion(build_hf_model(model, image_token_id, vocab), tok, image_token_id, rows, added)


def _finished_checkpoint(cfg: PipelineConfig, phase: str) -> Path:
    ckpt = cfg.checkpoint_dir(phase)
    if not (ckpt / "train_summary.json").is_file():
        raise FileNotFoundError(f"{ckpt} holds no finished checkpoint: train {phase} first")
    return ckpt


def export_hf(cfg: PipelineConfig, phase: str = "phase2") -> ExportResult:
    """Convert the finished `checkpoints/<phase>/` to `models/hf/` (atomic: temporary folder, then rename)."""
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    ckpt = _finished_checkpoint(cfg, phase)
    model = load_model(ckpt).eval()
    conv = hf_from_training(model, AutoTokenizer.from_pretrained(ckpt / "tokenizer"))
    size = model.image_model.config.image_size
    # do_pad: LLaVA-1.5 "pad", expand to square with the mean colour first
    image_processor = clip_image_processor(size, LlavaImageProcessorPil, do_pad=True)
    style = cfg.hdf5["phase2"].prompt_style
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=conv.tokenizer,
        patch_size=model.image_model.config.patch_size,
        vision_feature_select_strategy="default",
        chat_template=vicuna_chat_template(style if style in SYSTEM_PROMPTS else "vicuna_v1"),
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    out = cfg.path("models") / "hf"
    tmp = partial_dir(out)
    with staged(out, tmp):
        conv.model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        train_summary = json.loads((ckpt / "train_summary.json").read_text())
        write_json_atomic(
            tmp / EXPORT_INFO,
            {
                "source_checkpoint": str(ckpt),
                "phase": phase,
                "image_token_id": conv.image_token_id,
                "image_patch_start_idx": train_summary["image_patch_start_idx"],
                "prompt_style": style,
                "original_vocab_size": conv.original_vocab_size,
                "added_tokens": conv.added_tokens,
            },
        )
    replace_dir(tmp, out)
    return ExportResult(out, sum(p.numel() for p in conv.model.parameters()), conv.image_token_id)


def read_hf(hf_dir: Path) -> tuple[LlavaModel, object, dict]:
    """A Hugging Face LLaVA folder -> (training-format model, tokenizer, facts), undoing our export's additions.

    Any llava-hf style folder works (CLIP vision tower, `default` feature selection, gelu projector with bias);
    for a folder this project exported, `export_info.json` says which rows and tokens the export added.
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir)
    c = hf.config
    problems = []
    if c.vision_feature_select_strategy != "default":
        problems.append(f"vision_feature_select_strategy {c.vision_feature_select_strategy!r} (supported: 'default')")
    if not isinstance(c.vision_feature_layer, int):
        problems.append(f"vision_feature_layer {c.vision_feature_layer!r} (supported: one layer index)")
    if c.projector_hidden_act != "gelu" or not getattr(c, "multimodal_projector_bias", True):
        problems.append("projector (supported: mlp2x_gelu, Linear-GELU-Linear with bias)")
    if c.vision_config.model_type != "clip_vision_model":
        problems.append(f"vision tower {c.vision_config.model_type!r} (supported: clip_vision_model)")
    if problems:
        raise ValueError(f"{hf_dir}: cannot convert to the training format: {'; '.join(problems)}")
    state = from_hf_state_dict(hf.state_dict())
    tok = AutoTokenizer.from_pretrained(hf_dir)
    info = json.loads((hf_dir / EXPORT_INFO).read_text()) if (hf_dir / EXPORT_INFO).is_file() else {}
    text_config = c.text_config.to_dict()
    trimmed = 0
    original = info.get("original_vocab_size")
    if original is not None and original < vocab_rows(state):  # rows our export padded
        trimmed = vocab_rows(state) - original
        state = trim_vocab(state, original)
        text_config["vocab_size"] = original
    model = model_from_config_dict(
        {
            "vision_config": c.vision_config.to_dict(),
            "text_config": text_config,
            "projector": "mlp2x_gelu",
            "vision_feature_layer": c.vision_feature_layer,
        }
    )
    _load_exact(model, state, hf_dir)
    facts = {"image_token_id": c.image_token_index, "trimmed_rows": trimmed, "export_info": info}
    return model.eval(), tok, facts


def _load_exact(model: LlavaModel, state: dict[str, torch.Tensor], where: Path) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _image_start(tok, style: str, num_patches: int) -> int:
    enc = encode_conversation(
        [{"from": "human", "value": f"{IMAGE_TOKEN}\nx"}], tok, style, num_patches, tok.pad_token_id or 0, True
    )
    return enc.image_start


def import_hf(hf_dir: Path, out: Path, prompt_style: str = "vicuna_v1") -> ImportResult:
    """A Hugging Face LLaVA folder -> a training-format checkpoint folder in `out` (atomic).

    The folder is what training writes (`model.safetensors`, `model_config.json`, `tokenizer/`) plus
    `train_summary.json` (marks it finished; its `image_patch_start_idx` is for `prompt_style`) and
    `import_info.json`. Used as `checkpoints/phase1` it is the start of a phase-2 fine-tune; `export` and
    `predict` take it like any checkpoint.
    """
    check_style(prompt_style)
    hf_dir, out = Path(hf_dir), Path(out)
    model, tok, facts = read_hf(hf_dir)
    tmp = partial_dir(out)
    with staged(out, tmp):
        save_model(model, tmp)
        tok.save_pretrained(tmp / "tokenizer")
        info = facts["export_info"]
        removed: list[str] = []
        if facts["trimmed_rows"] and info.get("added_tokens"):
            removed = drop_added_tokens(tmp / "tokenizer", info["original_vocab_size"])
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tmp / "tokenizer")
        if tok.pad_token_id is None and tok.unk_token_id is not None:
            tok.pad_token = tok.unk_token
        start = _image_start(tok, prompt_style, model.num_patches)
        write_json_atomic(
            tmp / IMPORT_INFO,
            {
                "source": str(hf_dir),
                "format": "hf",
                "prompt_style": prompt_style,
                "removed_tokens": removed,
                "trimmed_rows": facts["trimmed_rows"],
            },
        )
        write_json_atomic(
            tmp / "train_summary.json",
            {"phase": "imported", "steps": 0, "source": str(hf_dir), "image_patch_start_idx": start},
        )
    replace_dir(tmp, out)
    vocab = model.text_model.get_input_embeddings().num_embeddings
    return ImportResult(out, sum(p.numel() for p in model.parameters()), hf_dir, vocab, facts["trimmed_rows"])


# --- training <-> original LLaVA repository --------------------------------------------------------------------


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
    rope = d.get("rope_parameters") or {}
    if "rope_theta" in rope:  # where the LLaVA repo's transformers 4.x reads it
        d.setdefault("rope_theta", rope["rope_theta"])
    return d


def write_llava_original(model: LlavaModel, tok, folder: Path, vision_tower: str) -> None:
    """Write `folder/image_model/` and `folder/text_model_llava/` (the caller makes it atomic)."""
    from safetensors.torch import save_file

    parts = to_llava_state_dict({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    image_dir, text_dir = folder / LLAVA_IMAGE_DIR, folder / LLAVA_TEXT_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    text_dir.mkdir(parents=True, exist_ok=True)
    vc = copy.deepcopy(model.image_model.config)
    vc.architectures = ["CLIPVisionModel"]
    vc.save_pretrained(image_dir)
    save_file(parts[LLAVA_IMAGE_DIR], str(image_dir / "model.safetensors"), metadata={"format": "pt"})
    clip_image_processor(model.image_model.config.image_size).save_pretrained(image_dir)
    save_file(parts[LLAVA_TEXT_DIR], str(text_dir / "model.safetensors"), metadata={"format": "pt"})
    (text_dir / "config.json").write_text(json.dumps(llava_text_config(model, vision_tower), indent=2, default=str))
    tok.save_pretrained(text_dir)


def export_llava(cfg: PipelineConfig, phase: str = "phase2") -> LlavaExportResult:
    """Convert the finished `checkpoints/<phase>/` to the original LLaVA layout in `models/llava/` (atomic).

    `mm_vision_tower` holds the absolute path of `models/llava/image_model` (the LLaVA repo loads the tower from
    there; its eval scripts take `models/llava/text_model_llava` as --model-path, a path containing "llava").
    """
    from transformers import AutoTokenizer

    ckpt = _finished_checkpoint(cfg, phase)
    model = load_model(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    out = cfg.path("models") / "llava"
    tmp = partial_dir(out)
    with staged(out, tmp):
        write_llava_original(model, tok, tmp, str((out / LLAVA_IMAGE_DIR).resolve()))
        write_json_atomic(tmp / EXPORT_INFO, {"source_checkpoint": str(ckpt), "phase": phase, "format": "llava"})
    replace_dir(tmp, out)
    return LlavaExportResult(
        out, sum(p.numel() for p in model.parameters()), out / LLAVA_IMAGE_DIR, out / LLAVA_TEXT_DIR
    )


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All weights of a model folder: `model*.safetensors` (single or sharded), else `pytorch_model*.bin` read
    with weights_only=True (other pickles there, such as training_args.bin, are never opened)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        files = sorted(folder.glob("pytorch_model*.bin"))
        if not files:
            raise FileNotFoundError(f"{folder} holds no model*.safetensors or pytorch_model*.bin weights")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


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
    """The local folder `mm_vision_tower` names: as written, relative to the text folder, or the sibling image_model."""
    for cand in (Path(tower), text_dir / tower, text_dir.parent / LLAVA_IMAGE_DIR):
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
        vision_config = _vision_config_of(AutoConfig.from_pretrained(image_dir))
        raw = _load_weights(image_dir)
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
    text_state = {k: v for k, v in _load_weights(text_dir).items() if not k.startswith("model.vision_tower.")}
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
    _load_exact(model, state, text_dir)
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
            tmp / "train_summary.json",
            {
                "phase": "imported",
                "steps": 0,
                "source": str(folder),
                "image_patch_start_idx": _image_start(tok, prompt_style, model.num_patches),
            },
        )
    replace_dir(tmp, out)
    vocab = model.text_model.get_input_embeddings().num_embeddings
    return ImportResult(out, sum(p.numel() for p in model.parameters()), folder, vocab, 0)
