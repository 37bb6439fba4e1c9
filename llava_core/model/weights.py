"""Checkpoint conversion's shared pieces: pure state-dict functions driven by key maps (the torchtune way), the
vocabulary rows an export adds, the `<image>` token, the CLIP image processor, and reading weights back.

Each direction of `model.hf` and `model.original` is these functions plus a key map, so every direction is
testable by a round trip. Weights are written as safetensors only; `.bin` files of original checkpoints are
read with weights_only=True.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llava_core.artifacts import TRAIN_SUMMARY
from llava_core.data.prompts import encode_conversation
from llava_core.model.llava import LlavaModel

if TYPE_CHECKING:  # the model conversions load without pydantic (benchmarks/gpu_check.py)
    from llava_core.config import PipelineConfig

IMAGE_TOKEN = "<image>"


VOCAB_KEYS = ("text_model.model.embed_tokens.weight", "text_model.lm_head.weight")
# config keys of the original LLaVA `LlavaLlamaForCausalLM` that are not the language model's


@dataclass
class ImportResult:
    path: Path
    parameters: int
    source: Path
    vocab_size: int
    trimmed_rows: int  # embedding rows the export had added (and the import removed again)


def remap(state: dict[str, torch.Tensor], pairs: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    """Rename every key by the longest source prefix that matches it; a key no pair covers is an error."""
    out = {}
    for key, value in state.items():
        matches = [(src, dst) for src, dst in pairs if key.startswith(src)]
        if not matches:
            raise KeyError(f"no mapping for parameter {key!r}; mapped prefixes: {[s for s, _ in pairs]}")
        src, dst = max(matches, key=lambda m: len(m[0]))
        out[dst + key[len(src) :]] = value
    return out


def reverse_map(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((dst, src) for src, dst in pairs)


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


def clip_image_processor(size: int, cls=None, **extra):
    """The CLIP preprocessing of `images.clip_transform` as a transformers image processor (default CLIP's)."""
    from llava_core.data.images import CLIP_MEAN, CLIP_STD  # Pillow's: exports need it, the GPU check does not

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


def finished_checkpoint(cfg: PipelineConfig, phase: str) -> Path:
    ckpt = cfg.checkpoint_dir(phase)
    if not (ckpt / TRAIN_SUMMARY).is_file():
        raise FileNotFoundError(f"{ckpt} holds no finished checkpoint: train {phase} first")
    return ckpt


def load_exact(model: LlavaModel, state: dict[str, torch.Tensor], where: Path) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def image_start_for(tok, style: str, num_patches: int) -> int:
    enc = encode_conversation(
        [{"from": "human", "value": f"{IMAGE_TOKEN}\nx"}], tok, style, num_patches, tok.pad_token_id or 0, True
    )
    return enc.image_start


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
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
