"""Stage 5a, training <-> Hugging Face: `models/hf/` laid out like the llava-hf model folders (weights under the
names transformers 4.x and llava-hf use, sharded past `export.max_shard_size`; config, processor and tokenizer
files transformers 4.37, 4.57 and 5.x read; llava-hf's chat template), and any llava-hf style folder back to the
training format (to fine-tune or evaluate existing weights).

When a tokenizer lacks `<image>`, the export adds it past the vocabulary and pads the embeddings to a multiple
of 64 (as llava-hf does: 32000 -> 32064); `export_info.json` records the original vocabulary so the import
trims the rows and the token again and the round trip stays bit-identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llava_core.artifacts import EXPORT_INFO, IMPORT_INFO, TRAIN_SUMMARY
from llava_core.atomic import partial_dir, replace_dir, staged, write_json_atomic
from llava_core.data.prompts import check_style
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
    save_weights,
    trim_vocab,
    vocab_rows,
    with_rope_theta,
    write_classic_tokenizer,
)

if TYPE_CHECKING:  # the conversion loads without pydantic (benchmarks/gpu_check.py)
    from llava_core.config import PipelineConfig

VOCAB_MULTIPLE = 64  # llava-hf pads its embeddings to a multiple of 64 after adding <image> (32000 -> 32064)

# training-format prefix -> Hugging Face LlavaForConditionalGeneration prefix (transformers 5.x in-memory layout)
HF_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("image_model.", "model.vision_tower."),
    ("projector.0.", "model.multi_modal_projector.linear_1."),
    ("projector.2.", "model.multi_modal_projector.linear_2."),
    ("text_model.model.", "model.language_model."),
    ("text_model.lm_head.", "lm_head."),
)
# transformers 5.x in-memory prefix -> the names in llava-hf's files and transformers' own conversion
# (convert_llava_weights_to_hf), which are 4.x's in-memory names; 5.x renames them back when it loads
HF_FILE_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def llava_hf_chat_template(assistant_marks: bool = True) -> str:
    """What llava-hf's chat template renders (llava-hf/llava-1.5-7b-hf, chat_template.json), written here: a role
    prefix `USER: ` / `ASSISTANT: ` (none for `system`), a message's images first as `<image>\\n`, then each text
    followed by one space; `ASSISTANT:` for add_generation_prompt. No BOS (the tokenizer adds it), no system
    prompt, no `</s>`. A message's content may also be a plain string (one text), which llava-hf's ignores.

    `assistant_marks`: the answers inside `{% generation %}` (assistant masks), as llava-hf's; transformers 4.37
    cannot parse that tag, so the tokenizer's copy goes without (same text).
    """

    def text(expr: str) -> str:
        out = "{{ " + expr + " + ' ' }}"
        if not assistant_marks:
            return out
        marked = "{% generation %}" + out + "{% endgeneration %}"
        return "{% if message['role'] == 'assistant' %}" + marked + "{% else %}" + out + "{% endif %}"

    return (
        "{% for message in messages %}"
        "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
        "{% if message['content'] is string %}" + text("message['content']") + "{% else %}"
        "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
        "{% for part in message['content'] if part['type'] == 'text' %}" + text("part['text']") + "{% endfor %}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )


LLAVA_HF_CHAT_TEMPLATE = llava_hf_chat_template()


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


def llava_hf_config(hf) -> dict:
    """config.json: the LlavaConfig as 5.x writes it, plus what 4.x reads: `rope_theta` in the text config and
    the top-level `vocab_size` and `architectures` of llava-hf's configs."""
    d = hf.config.to_dict()
    d["architectures"] = ["LlavaForConditionalGeneration"]
    with_rope_theta(d["text_config"])
    d["vocab_size"] = d["text_config"]["vocab_size"]
    return d


def write_hf_folder(
    conv: HFConversion, patch_size: int, image_size: int, folder: Path, max_shard_bytes: int, tokenizer_dir: Path
) -> None:
    """The files of a llava-hf model folder, for transformers 4.37, 4.57 and 5.x (docs/formats.md).

    preprocessor_config.json is the image processor (4.37 builds its CLIPImageProcessor from it), kept out of
    processor_config.json, which holds only what the processor itself takes (4.57 and 5.x expand `<image>` with
    its `patch_size`); chat_template.json is the processor's template, and the tokenizer carries the same one for
    releases whose processor has none (4.37).
    """
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llava_hf_config(conv.model), indent=2, sort_keys=True) + "\n")
    conv.model.generation_config.save_pretrained(folder)
    save_weights(remap(conv.model.state_dict(), HF_FILE_KEY_MAP), folder, max_shard_bytes)
    # do_pad: LLaVA-1.5 "pad", expand to square with the mean colour first (4.37's CLIPImageProcessor ignores it)
    clip_image_processor(image_size, LlavaImageProcessorPil, do_pad=True).save_pretrained(folder)
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    write_json_atomic(folder / "preprocessor_config.json", {**preprocessor, "processor_class": "LlavaProcessor"})
    processor = {
        "processor_class": "LlavaProcessor",
        "image_token": IMAGE_TOKEN,
        "num_additional_image_tokens": 1,  # the CLS position, dropped again by the `default` strategy
        "patch_size": patch_size,
        "vision_feature_select_strategy": "default",
    }
    write_json_atomic(folder / "processor_config.json", processor)
    write_json_atomic(folder / "chat_template.json", {"chat_template": LLAVA_HF_CHAT_TEMPLATE})
    template = llava_hf_chat_template(assistant_marks=False)
    write_classic_tokenizer(conv.tokenizer, folder, source=tokenizer_dir, chat_template=template)


def export_hf(cfg: PipelineConfig, phase: str = "phase2") -> ExportResult:
    """Convert the finished `checkpoints/<phase>/` to `models/hf/` (atomic: temporary folder, then rename)."""
    from transformers import AutoTokenizer

    ckpt = finished_checkpoint(cfg, phase)
    model = load_model(ckpt).eval()
    conv = hf_from_training(model, AutoTokenizer.from_pretrained(ckpt / "tokenizer"))
    vc = model.image_model.config
    out = cfg.path("models") / "hf"
    tmp = partial_dir(out)
    with staged(out, tmp):
        write_hf_folder(conv, vc.patch_size, vc.image_size, tmp, cfg.export.max_shard_bytes, ckpt / "tokenizer")
        train_summary = json.loads((ckpt / TRAIN_SUMMARY).read_text())
        write_json_atomic(
            tmp / EXPORT_INFO,
            {
                "source_checkpoint": cfg.rel(ckpt),  # relative to the workspace root: portable
                "phase": phase,
                "image_token_id": conv.image_token_id,
                "image_patch_start_idx": train_summary["image_patch_start_idx"],
                "prompt_style": cfg.hdf5["phase2"].prompt_style,
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
