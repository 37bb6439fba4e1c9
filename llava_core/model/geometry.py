"""The vision tower's geometry (image size, patch size) read from its config, without the modelling code: the
HDF5 writer needs the number of image slots, and importing the model (torch, transformers' CLIP and Llama
modules) would cost every data-stage process about 2 s."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import AutoConfig, PretrainedConfig

if TYPE_CHECKING:
    from llava_core.config import PipelineConfig


def vision_config_of(cfg: PretrainedConfig) -> PretrainedConfig:
    """A full CLIP config (as in openai/clip-vit-large-patch14-336) carries the vision part inside."""
    return cfg.vision_config if hasattr(cfg, "vision_config") else cfg


def vision_geometry(cfg: PipelineConfig) -> tuple[int, int]:
    """(image_size, patch_size) of the configured vision tower, without building it."""
    m = cfg.model
    if m.vision_config is not None:
        return int(m.vision_config["image_size"]), int(m.vision_config["patch_size"])
    vc = vision_config_of(AutoConfig.from_pretrained(cfg.resolve_file(m.vision_pretrained)))
    return int(vc.image_size), int(vc.patch_size)
