"""The LLaVA model: CLIP vision tower + mlp2x_gelu projector + causal language model.

Parameter names are the contract the freeze patterns and checkpoint conversion rely on:
`image_model.*` (a transformers CLIPVisionModel), `projector.0/2.*` (Linear, GELU, Linear) and
`text_model.*` (a transformers causal LM, Llama architecture). The tiny and the 7B presets build the model
through the same code; only the numbers and paths differ.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
)

from llava_core.artifacts import MODEL_CONFIG, WEIGHTS

if TYPE_CHECKING:
    from llava_core.config import PipelineConfig


class LlavaModel(nn.Module):
    """Vision tower -> projector -> language model; projected patches replace the image-slot embeddings."""

    def __init__(self, image_model: CLIPVisionModel, text_model: nn.Module, vision_feature_layer: int = -2) -> None:
        super().__init__()
        self.image_model = image_model
        v_hidden = image_model.config.hidden_size
        t_hidden = text_model.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(v_hidden, t_hidden), nn.GELU(), nn.Linear(t_hidden, t_hidden))
        self.text_model = text_model
        self.vision_feature_layer = vision_feature_layer

    @property
    def num_patches(self) -> int:
        c = self.image_model.config
        return (c.image_size // c.patch_size) ** 2

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, P, D_text): second-to-last layer, CLS dropped ('patch' / HF 'default')."""
        frozen = not any(p.requires_grad for p in self.image_model.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            dtype = self.image_model.embeddings.patch_embedding.weight.dtype
            out = self.image_model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
            feats = out.hidden_states[self.vision_feature_layer][:, 1:]  # (B, P, D_vision)
        return self.projector(feats)

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, has_image: torch.Tensor, image_start: int
    ) -> torch.Tensor:
        """Token embeddings with the `P` slots from `image_start` replaced by image features where has_image."""
        emb = self.text_model.get_input_embeddings()(input_ids)  # (B, T, D)
        if not bool(has_image.any()):
            return emb
        feats = self.image_features(pixel_values).to(emb.dtype)  # (B, P, D)
        p = feats.shape[1]
        slots = emb[:, image_start : image_start + p]
        slots = torch.where(has_image.view(-1, 1, 1), feats, slots)
        return torch.cat([emb[:, :image_start], slots, emb[:, image_start + p :]], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        has_image: torch.Tensor,
        image_start: int,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits (B, T, V), loss). `labels` are already shifted: logits[:, t] predicts labels[:, t]."""
        embeds = self.embed(input_ids, pixel_values, has_image, image_start)
        logits = self.text_model(inputs_embeds=embeds, attention_mask=attention_mask).logits
        loss = None
        if labels is not None and loss_mask is not None:
            loss = masked_lm_loss(logits, labels, loss_mask)
        return logits, loss


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy times loss_mask, divided by the number of loss tokens (docs/formats.md, "The model")."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    mask = loss_mask.flatten().to(ce.dtype)
    n = mask.sum()
    if n == 0:
        raise ValueError("a batch with no loss tokens: the HDF5 stage should have rejected these examples")
    return (ce * mask).sum() / n


@dataclass
class FreezeReport:
    trainable: int
    frozen: int
    trainable_prefixes: dict[str, int]

    def summary(self) -> str:
        parts = ", ".join(f"{k}: {v:,}" for k, v in sorted(self.trainable_prefixes.items())) or "nothing"
        return f"trainable {self.trainable:,} / {self.trainable + self.frozen:,} parameters ({parts})"


def trainable_report(model: nn.Module) -> FreezeReport:
    """What trains now: parameter counts, and the trainable ones by top-level module."""
    trainable = frozen = 0
    prefixes: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            trainable += param.numel()
            top = name.split(".")[0]
            prefixes[top] = prefixes.get(top, 0) + param.numel()
        else:
            frozen += param.numel()
    return FreezeReport(trainable, frozen, prefixes)


def apply_freeze(model: nn.Module, patterns: list[str]) -> FreezeReport:
    """Freeze every parameter whose name matches one of the regex patterns; report what trains."""
    compiled = [re.compile(p) for p in patterns]
    for name, param in model.named_parameters():
        param.requires_grad_(not any(c.search(name) for c in compiled))
    report = trainable_report(model)
    if report.trainable == 0:
        raise ValueError(f"freeze patterns {patterns} leave nothing to train")
    return report


def enable_gradient_checkpointing(model: LlavaModel) -> None:
    """Recompute activations in the backward pass (transformers' non-reentrant checkpointing) in both towers.

    Non-reentrant checkpointing lets gradients reach the projector through a frozen language model, which the
    reentrant variant would cut when no input of a checkpointed block requires grad.
    """
    kwargs = {"use_reentrant": False}
    model.text_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    model.text_model.config.use_cache = False
    if any(p.requires_grad for p in model.image_model.parameters()):
        model.image_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


def apply_lora(model: LlavaModel, r: int, alpha: int, dropout: float, target_modules: list[str]) -> FreezeReport:
    """LoRA adapters (peft) on the language model's `target_modules`; only they train in the LM.

    The base LM weights are frozen whatever the freeze patterns said about `^text_model`; the projector and
    the vision tower keep their freeze state. `merge_lora` folds the adapters back before saving, so a
    checkpoint stays a plain `LlavaModel` that export and conversion read unchanged.
    """
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.text_model.named_modules()}
    missing = sorted(set(target_modules) - names)
    if missing:
        raise ValueError(f"lora.target_modules {missing} are not modules of the language model")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
    model.text_model = get_peft_model(model.text_model, config)
    return trainable_report(model)


def has_lora(model: LlavaModel) -> bool:
    from peft import PeftModel

    return isinstance(model.text_model, PeftModel)


def lora_state(model: LlavaModel) -> tuple[dict[str, torch.Tensor], dict]:
    """(adapter weights as peft saves them, adapter config) of a model with LoRA."""
    from peft import get_peft_model_state_dict

    peft_model = model.text_model
    return get_peft_model_state_dict(peft_model), peft_model.peft_config["default"].to_dict()


def merge_lora(model: LlavaModel) -> LlavaModel:
    """Fold the LoRA adapters into the LM weights (W + B A * alpha / r) and drop the peft wrappers."""
    if has_lora(model):
        model.text_model = model.text_model.merge_and_unload()
    return model


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # `model.dtype` -> torch


def parameter_dtype(model: nn.Module) -> str:
    """The one dtype of the model's parameters by its `model.dtype` name (`train_summary.json` records it)."""
    found = {p.dtype for p in model.parameters()}
    names = sorted(str(d).removeprefix("torch.") for d in found)
    if len(found) != 1:
        raise ValueError(f"the model's parameters have several dtypes: {names}")
    return names[0]


def build_model(cfg: PipelineConfig, vocab_size: int, special_ids: dict[str, int]) -> LlavaModel:
    """A fresh model from the preset: pretrained folders/hub ids, or configs with seeded random init.

    Every weight is held in `model.dtype` whatever the files store: transformers 5 would otherwise keep a
    checkpoint's own dtype (fp16 for Vicuna-v1.5), and the optimizer would then update fp16 weights.
    """
    m = cfg.model
    dtype = DTYPES[m.dtype]
    torch.manual_seed(m.init_seed)
    if m.vision_pretrained:
        image_model = CLIPVisionModel.from_pretrained(cfg.resolve_file(m.vision_pretrained), dtype=dtype)
    else:
        image_model = CLIPVisionModel(CLIPVisionConfig(**m.vision_config))
    if m.text_pretrained:
        text_model = AutoModelForCausalLM.from_pretrained(cfg.resolve_file(m.text_pretrained), dtype=dtype)
        if text_model.get_input_embeddings().num_embeddings < vocab_size:
            text_model.resize_token_embeddings(vocab_size)
    else:
        text_model = AutoModelForCausalLM.from_config(
            LlamaConfig(**m.text_config, vocab_size=vocab_size, **special_ids)
        )
    return LlavaModel(image_model, text_model, m.vision_feature_layer).to(dtype)  # the projector too


def model_config_dict(model: LlavaModel) -> dict:
    """Everything needed to rebuild the architecture (no run settings)."""
    return {
        "vision_config": model.image_model.config.to_dict(),
        "text_config": model.text_model.config.to_dict(),
        "projector": "mlp2x_gelu",
        "vision_feature_layer": model.vision_feature_layer,
    }


def model_from_config_dict(d: dict) -> LlavaModel:
    vision = CLIPVisionModel(CLIPVisionConfig.from_dict(d["vision_config"]))
    text_cfg = dict(d["text_config"])
    model_type = text_cfg.pop("model_type", "llama")
    text = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **text_cfg))
    if d.get("projector", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"unknown projector {d['projector']!r}; valid: mlp2x_gelu")
    return LlavaModel(vision, text, d.get("vision_feature_layer", -2))


def save_model(model: LlavaModel, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Weights (safetensors) + architecture config into `folder` (the caller makes it atomic).

    `state` is the full state dict when the caller gathered it (FSDP / ZeRO-3 shards); default: the model's.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state or model.state_dict()).items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / MODEL_CONFIG).write_text(json.dumps(model_config_dict(model), indent=2, default=str))


def load_model(folder: Path) -> LlavaModel:
    """Rebuild a model from a checkpoint folder alone."""
    from safetensors.torch import load_file

    folder = Path(folder)
    model = model_from_config_dict(json.loads((folder / MODEL_CONFIG).read_text()))
    state = load_file(str(folder / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied or buffer-only keys may be absent; anything else is a broken checkpoint
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model
