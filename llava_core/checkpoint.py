"""Stage 5a, checkpoint conversion: training checkpoint -> Hugging Face `LlavaForConditionalGeneration`.

Conversion is a pure function over state dicts driven by a key map (the torchtune way), so it is testable by
a round trip. The HF folder holds the model (safetensors), its config and a processor (image processor with
pad-to-square, tokenizer with the `<image>` token, chat template) and is loadable by transformers alone.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_core.config import PipelineConfig, write_json_atomic
from llava_core.images import CLIP_MEAN, CLIP_STD
from llava_core.model import LlavaModel, load_model
from llava_core.prompts import SYSTEM_PROMPTS

IMAGE_TOKEN = "<image>"
# training-format prefix -> Hugging Face LlavaForConditionalGeneration prefix (transformers 5.x layout)
HF_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("image_model.", "model.vision_tower."),
    ("projector.0.", "model.multi_modal_projector.linear_1."),
    ("projector.2.", "model.multi_modal_projector.linear_2."),
    ("text_model.model.", "model.language_model."),
    ("text_model.lm_head.", "lm_head."),
)


@dataclass
class ExportResult:
    path: Path
    parameters: int
    image_token_id: int


def _remap(state: dict[str, torch.Tensor], pairs: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for src, dst in pairs:
            if key.startswith(src):
                out[dst + key[len(src) :]] = value
                break
        else:
            raise KeyError(f"no mapping for parameter {key!r}")
    return out


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _remap(state, HF_KEY_MAP)


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _remap(state, tuple((dst, src) for src, dst in HF_KEY_MAP))


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


def build_hf_model(model: LlavaModel, image_token_id: int):
    """An in-memory `LlavaForConditionalGeneration` with exactly the training model's weights."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vc, tc = model.image_model.config, model.text_model.config
    config = LlavaConfig(
        vision_config=vc.to_dict(),
        text_config=tc.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=model.num_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=model.vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
    )
    hf = LlavaForConditionalGeneration(config)
    state = to_hf_state_dict(model.state_dict())
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"HF layout mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf.eval()


def export_hf(cfg: PipelineConfig, phase: str = "phase2") -> ExportResult:
    """Convert the finished `checkpoints/<phase>/` to `models/hf/` (atomic: temporary folder, then rename)."""
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    ckpt = cfg.checkpoint_dir(phase)
    if not (ckpt / "train_summary.json").is_file():
        raise FileNotFoundError(f"{ckpt} holds no finished checkpoint: train {phase} first")
    model = load_model(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tok.unk_token_id:
        raise ValueError(
            f"tokenizer in {ckpt} has no {IMAGE_TOKEN} token; the tiny tokenizer ships with one "
            "(adding one to a real tokenizer is done by the full conversion stage)"
        )
    hf = build_hf_model(model, image_token_id)
    size = model.image_model.config.image_size
    patch = model.image_model.config.patch_size
    image_processor = LlavaImageProcessorPil(
        do_pad=True,
        do_resize=True,
        size={"shortest_edge": size},
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
        resample=3,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=vicuna_chat_template(cfg.hdf5["phase2"].prompt_style),
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    out = cfg.path("models") / "hf"
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    hf.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    train_summary = json.loads((ckpt / "train_summary.json").read_text())
    write_json_atomic(
        tmp / "export_info.json",
        {
            "source_checkpoint": str(ckpt),
            "phase": phase,
            "image_token_id": image_token_id,
            "image_patch_start_idx": train_summary["image_patch_start_idx"],
            "prompt_style": cfg.hdf5["phase2"].prompt_style,
        },
    )
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return ExportResult(out, sum(p.numel() for p in hf.parameters()), image_token_id)
