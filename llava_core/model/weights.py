"""Checkpoint conversion's shared pieces: pure state-dict functions driven by key maps (the torchtune way), the
vocabulary rows an export adds, the `<image>` token, the CLIP image processor, and reading weights back.

Each direction of `model.hf` and `model.original` is these functions plus a key map, so every direction is
testable by a round trip. Weights are written as safetensors only (sharded past a size, with the index
transformers and Cerebras read); `.bin` files of original checkpoints are read with weights_only=True. Tokenizers
are written in the form transformers 4.37-5.x and tokenizers 0.15 all read (`write_classic_tokenizer`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llava_core.artifacts import TRAIN_SUMMARY, WEIGHTS
from llava_core.data.prompts import encode_conversation
from llava_core.model.llava import LlavaModel

if TYPE_CHECKING:  # the model conversions load without pydantic (benchmarks/gpu_check.py)
    from llava_core.config import PipelineConfig

IMAGE_TOKEN = "<image>"
WEIGHTS_INDEX = "model.safetensors.index.json"  # the shard index transformers and Cerebras' converter read
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
TOKENIZER_CONFIG = "tokenizer_config.json"


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
    cfg_path = tokenizer_dir / TOKENIZER_CONFIG
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


# keys transformers 5 writes into tokenizer_config.json that mean nothing to 4.x (`extra_special_tokens` as a
# list breaks 4.57, which wants a dict: it is rewritten below)
V5_ONLY_TOKENIZER_KEYS = ("backend", "is_local", "local_files_only")


def classic_tokenizer_class(name: str, model: dict) -> str:
    """A class transformers 4.x knows for a tokenizer saved by 5.x: its generic `TokenizersBackend` becomes
    LlamaTokenizerFast for a SentencePiece-style BPE with byte fallback (Llama, Vicuna, Mistral), else
    PreTrainedTokenizerFast; `XTokenizer` becomes `XTokenizerFast`. 4.x uses a class named `...Fast` as named
    even under `use_fast=False` (LLaVA's loader), so it loads from tokenizer.json with no SentencePiece model."""
    if name in ("", "TokenizersBackend", "PreTrainedTokenizerFast"):
        llama_like = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
        return "LlamaTokenizerFast" if llama_like else "PreTrainedTokenizerFast"
    return name if name.endswith("Fast") else f"{name}Fast"


def merge_text(merge: str | list[str]) -> str:
    """A BPE merge as an "a b" string, the form older tokenizers (0.15) parse; current ones read both forms."""
    if isinstance(merge, str):
        return merge
    if any(" " in part for part in merge):
        raise ValueError(f"BPE merge {merge!r} holds a space: it has no form older tokenizers (0.15) read")
    return " ".join(merge)


def sentencepiece_normalizer(tj: dict) -> dict:
    """tokenizer.json with transformers 5's Llama pipeline (a Metaspace pre-tokenizer that does not split, which
    tokenizers 0.15 cannot parse) rewritten as the normaliser 4.x's Llama conversion wrote, which tokenises the
    same: spaces -> `▁`, then one `▁` before each text piece unless it starts with one (prepend_scheme `always`:
    prepend, then fold a doubled leading mark). A `first` scheme (non-legacy, Mistral-style) has no such form and
    is kept."""
    pre = tj.get("pre_tokenizer") or {}
    scheme = pre.get("prepend_scheme")
    if pre.get("type") != "Metaspace" or pre.get("split", True) or scheme not in ("always", "never"):
        return tj
    if tj.get("normalizer"):
        return tj
    mark = pre.get("replacement", "▁")
    steps = [{"type": "Replace", "pattern": {"String": " "}, "content": mark}]
    if scheme == "always":
        steps += [
            {"type": "Prepend", "prepend": mark},
            # \A, not ^: tokenizers' Oniguruma regexes match ^ after every newline
            {"type": "Replace", "pattern": {"Regex": f"\\A{mark}{mark}"}, "content": mark},
        ]
    return {**tj, "normalizer": {"type": "Sequence", "normalizers": steps}, "pre_tokenizer": None}


def _legacy(tok, tj: dict) -> bool:
    """SentencePiece's legacy layout (a word-boundary mark before every text piece) or not, as 4.x's Llama
    classes name it."""
    if hasattr(tok, "legacy"):
        return bool(tok.legacy)
    pre = tj.get("pre_tokenizer") or {}
    return not (pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first")


def write_classic_tokenizer(tok, folder: Path, source: Path | None = None, chat_template: str | None = None) -> None:
    """Save `tok` in `folder` in a form transformers 4.37 to 5.x and tokenizers 0.15 all read as this tokenizer.

    tokenizer.json keeps its pipeline (5.x's Llama pre-tokenizer in the equivalent form older tokenizers parse:
    `sentencepiece_normalizer`), with the BPE merges as "a b" strings; tokenizer_config.json names a class
    4.x knows (`classic_tokenizer_class`), spells out the BOS/EOS the tokenizer adds (4.x's Llama classes rebuild
    the post-processor from add_bos_token/add_eos_token) and holds `chat_template`; `source`'s SentencePiece
    `tokenizer.model` is copied when it has one (the slow classes read it).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)  # a template goes into tokenizer_config.json
    tj_path = folder / "tokenizer.json"
    tj = sentencepiece_normalizer(json.loads(tj_path.read_text(encoding="utf-8")))
    model = tj.get("model") or {}
    if model.get("type") == "BPE":
        model["merges"] = [merge_text(m) for m in model.get("merges", [])]
    tj_path.write_text(json.dumps(tj, ensure_ascii=False, indent=2), encoding="utf-8")
    cfg_path = folder / TOKENIZER_CONFIG
    tc = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key in V5_ONLY_TOKENIZER_KEYS:
        tc.pop(key, None)
    named = tc.pop("model_specific_special_tokens", None) or {}  # e.g. {"image_token": "<image>"}
    if not isinstance(tc.get("extra_special_tokens"), dict):
        tc.pop("extra_special_tokens", None)
        if named:
            tc["extra_special_tokens"] = named
    ids = tok("a").input_ids
    tc.update(
        tokenizer_class=classic_tokenizer_class(tc.get("tokenizer_class", ""), model),
        add_bos_token=tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id],
        add_eos_token=tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id],
        legacy=_legacy(tok, tj),
    )
    if chat_template is not None:
        tc["chat_template"] = chat_template
    cfg_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2), encoding="utf-8")
    if source is not None and (source / "tokenizer.model").is_file() and not (folder / "tokenizer.model").exists():
        shutil.copyfile(source / "tokenizer.model", folder / "tokenizer.model")


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
    """All weights of a model folder: the shards `model.safetensors.index.json` lists, else `model*.safetensors`,
    else `pytorch_model*.bin` read with weights_only=True (other pickles there, such as training_args.bin, are
    never opened)."""
    from safetensors.torch import load_file

    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
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
    if index.is_file() and state.keys() != weight_map.keys():
        raise ValueError(f"{folder}: the shards do not hold the tensors {WEIGHTS_INDEX} lists")
    return state


def shard_plan(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """The keys of each shard, in order: a shard is closed before a tensor would take it past `max_bytes` (a
    tensor larger than that gets a shard of its own), as transformers' `max_shard_size` does."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards if shards[0] else []


def save_weights(state: dict[str, torch.Tensor], folder: Path, max_bytes: int, always_index: bool = False) -> list[str]:
    """`state` as safetensors in `folder`: one `model.safetensors` when it fits in `max_bytes` (and not
    `always_index`), else shards `model-00001-of-0000N.safetensors` and `model.safetensors.index.json`
    (`metadata.total_size`, `weight_map`: key -> shard), the layout transformers writes. Returns the files."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    plan = shard_plan(state, max_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    if len(plan) <= 1 and not always_index:
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
        return [WEIGHTS]
    names = [SHARD_NAME.format(i + 1, len(plan)) for i in range(len(plan))]
    for name, keys in zip(names, plan, strict=True):
        save_file({k: state[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": {k: name for name, keys in zip(names, plan, strict=True) for k in keys},
    }
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*names, WEIGHTS_INDEX]


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (no second copy on disk), or a copy where the file system has no links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def with_rope_theta(text_config: dict) -> dict:
    """A text config with `rope_theta` also at the top level, where transformers 4.x reads it (5.x keeps it
    in `rope_parameters`)."""
    rope = text_config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        text_config.setdefault("rope_theta", rope["rope_theta"])
    return text_config
