"""Stage 5a, training <-> Hugging Face: `models/hf/` as `LlavaForConditionalGeneration` + processor (image
processor with pad-to-square, tokenizer with the `<image>` token, chat template), loadable by transformers alone,
and any llava-hf style folder back to the training format (to fine-tune or evaluate existing weights).

When a tokenizer lacks `<image>`, the export adds it past the vocabulary and pads the embeddings to a multiple
of 64 (as llava-hf does: 32000 -> 32064); `export_info.json` records the original vocabulary so the import
trims the rows and the token again and the round trip stays bit-identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llava_core.artifacts import EXPORT_INFO, IMPORT_INFO, TRAIN_SUMMARY
from llava_core.atomic import partial_dir, replace_dir, staged, write_json_atomic
from llava_core.config import PipelineConfig
from llava_core.data.prompts import SYSTEM_PROMPTS, check_style
from llava_core.model.llava import LlavaModel, load_model, model_from_config_dict, save_model
from llava_core.model.weights import (
    IMAGE_TOKEN,
    ImportResult,
    clip_image_processor,
    drop_added_tokens,
    ensure_image_token,
    finished_checkpoint,
    image_start_for,
    load_exact,
    pad_vocab,
    remap,
    reverse_map,
    trim_vocab,
    vocab_rows,
)

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


@dataclass
class ExportResult:
    path: Path
    parameters: int
    image_token_id: int


@dataclass
class HFConversion:
    """An in-memory HF model with its tokenizer, and what the conversion changed to get the `<image>` token."""

    model: object  # LlavaForConditionalGeneration
    tokenizer: object
    image_token_id: int
    original_vocab_size: int
    added_tokens: list[str] = field(default_factory=list)


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return remap(state, HF_KEY_MAP)


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return remap(state, reverse_map(HF_KEY_MAP))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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


def export_hf(cfg: PipelineConfig, phase: str = "phase2") -> ExportResult:
    """Convert the finished `checkpoints/<phase>/` to `models/hf/` (atomic: temporary folder, then rename)."""
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    ckpt = finished_checkpoint(cfg, phase)
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
        train_summary = json.loads((ckpt / TRAIN_SUMMARY).read_text())
        write_json_atomic(
            tmp / EXPORT_INFO,
            {
                "source_checkpoint": cfg.rel(ckpt),  # relative to the workspace root: portable
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
    load_exact(model, state, hf_dir)
    facts = {"image_token_id": c.image_token_index, "trimmed_rows": trimmed, "export_info": info}
    return model.eval(), tok, facts


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
        start = image_start_for(tok, prompt_style, model.num_patches)
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
            tmp / TRAIN_SUMMARY,
            {"phase": "imported", "steps": 0, "source": str(hf_dir), "image_patch_start_idx": start},
        )
    replace_dir(tmp, out)
    vocab = model.text_model.get_input_embeddings().num_embeddings
    return ImportResult(out, sum(p.numel() for p in model.parameters()), hf_dir, vocab, facts["trimmed_rows"])
