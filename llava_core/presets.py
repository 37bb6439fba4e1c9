"""Model presets: the numbers and paths of the `model`, `hdf5` and `train` sections, merged under params.yaml.

`tiny` is the CPU-sized model the embedded default trains in minutes; `llava-v1.5-7b` and `llava-v1.5-13b`
carry the published LLaVA-1.5 recipe (docs/stages.md). What a phase is (freezing, prompt layout) comes from
`llava_core.phases`; a preset adds only sizes, batch sizes, learning rates and where the weights are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llava_core.phases import PHASES

RESOURCES = Path(__file__).resolve().parent / "resources"
TINY_TOKENIZER = RESOURCES / "tiny_tokenizer"
# A folder packaged in llava_core/resources, named portably in params and in what stages record (an absolute path
# would differ between two checkouts and so change the outputs' DVC hashes): `PipelineConfig.resolve_file` finds it.
RESOURCE_PREFIX = "resource:"


def resource_name(folder: str) -> str:
    """`resource:<folder>`: the name params and artifacts use for `llava_core/resources/<folder>`."""
    return f"{RESOURCE_PREFIX}{folder}"


def resource_path(name: str) -> Path | None:
    """The packaged folder a `resource:<folder>` name stands for; None for any other name."""
    if not name.startswith(RESOURCE_PREFIX):
        return None
    return RESOURCES / name[len(RESOURCE_PREFIX) :]


# The published architectures, as transformers config fields (docs/gpus-and-clusters.md): the memory plan and the GPU
# check build from these numbers where no pretrained folder is on this machine (no weights are downloaded for either).
CLIP_VIT_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
}
LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
LLAMA2_13B = {**LLAMA2_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
              "num_attention_heads": 40, "num_key_value_heads": 40}  # fmt: skip
# A 1.1B Llama (TinyLlama's shape: 22 layers, grouped-query attention): the GPU check's language model.
LLAMA_1B = {**LLAMA2_7B, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
            "num_attention_heads": 32, "num_key_value_heads": 4}  # fmt: skip
KNOWN_ARCHITECTURES = {
    "openai/clip-vit-large-patch14-336": CLIP_VIT_L_336,
    "lmsys/vicuna-7b-v1.5": LLAMA2_7B,
    "lmsys/vicuna-13b-v1.5": LLAMA2_13B,
}


def _preset(model: dict, msl: dict[str, int], train: dict[str, dict], **train_common) -> dict:
    return {
        "model": model,
        "hdf5": {p: {"prompt_style": ph.prompt_style, "max_sequence_length": msl[p]} for p, ph in PHASES.items()},
        "train": {p: {**train_common, **train[p], "freeze": list(ph.freeze)} for p, ph in PHASES.items()},
    }


def tiny() -> dict:
    """CPU-sized: a 32 px CLIP tower and a 4-layer Llama built from configs, the tokenizer shipped here."""
    vision = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 4,
        "hidden_act": "quick_gelu",
        "projection_dim": 64,
    }
    text = {
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        # Llama's 0.02 suits hidden sizes in the thousands; at 128 the attention logits start near zero and the
        # question-conditioned lookup of the yes/no questions stays at chance for hundreds of steps
        # (docs/dataset.md has the measurements).
        "initializer_range": 0.08,
    }
    model = {
        "vision_config": vision,
        "text_config": text,
        "tokenizer": resource_name(TINY_TOKENIZER.name),
        "image_size": 32,
    }
    batch = {"global_batch_size": 32, "micro_batch_size": 32}
    return _preset(
        model,
        {"phase1": 112, "phase2": 288},
        {
            "phase1": {"epochs": 1, "learning_rate": 1e-3, **batch},
            "phase2": {"epochs": 4, "learning_rate": 3e-3, **batch},
        },
    )


def llava15(size: str) -> dict:
    """LLaVA-1.5 recipe numbers: CLIP ViT-L/14-336 + Vicuna-v1.5, bf16, 8 GPUs (docs/stages.md)."""
    model = {
        "vision_pretrained": "openai/clip-vit-large-patch14-336",
        "text_pretrained": f"lmsys/vicuna-{size}-v1.5",
        "tokenizer": f"lmsys/vicuna-{size}-v1.5",
        "image_size": 336,
    }
    return _preset(
        model,
        {"phase1": 2048, "phase2": 2048},
        {
            # LLaVA-1.5's scripts: pretrain.sh under ZeRO-2, finetune.sh under ZeRO-3, both with gradient
            # checkpointing (the memory plan: phase 2 of 7B does not fit 80 GB cards under DDP, docs/gpus-and-clusters.md)
            "phase1": {
                "epochs": 1,
                "global_batch_size": 256,
                "micro_batch_size": 32,
                "learning_rate": 1e-3,
                "accelerate_config": "configs/accelerate/deepspeed_zero2.yaml",
            },
            "phase2": {
                "epochs": 1,
                "global_batch_size": 128,
                "micro_batch_size": 16,
                "learning_rate": 2e-5,
                "accelerate_config": "configs/accelerate/deepspeed_zero3.yaml",
            },
        },  # fmt: skip
        mixed_precision="bf16",
        gradient_checkpointing=True,
    )


PRESETS: dict[str, Callable[[], dict]] = {
    "tiny": tiny,
    "llava-v1.5-7b": lambda: llava15("7b"),
    "llava-v1.5-13b": lambda: llava15("13b"),
}
