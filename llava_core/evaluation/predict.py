"""`predict`: one image + one prompt -> the model's answer, from any checkpoint format this project writes.

The folder's format is read from its files, never from its name: a training checkpoint (`model_config.json`),
a Hugging Face LLaVA folder (`config.json` of a `llava` model), or an original-LLaVA checkpoint (a
`text_model_llava/` folder or a config with `mm_vision_tower`), which is converted in memory. Every format ends
as an in-memory `LlavaForConditionalGeneration` and goes through `evaluate.generate`, the code the evaluation
stage uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llava_core.artifacts import EXPORT_INFO, IMPORT_INFO, MODEL_CONFIG, RUN_CONFIG
from llava_core.data.images import check_image, load_rgb
from llava_core.data.prompts import PROMPT_SUFFIXES, check_style

FORMATS = ("training", "hf", "llava")
DEFAULT_STYLE = "vicuna_v1"


@dataclass
class InferenceModel:
    model: object  # LlavaForConditionalGeneration, eval mode
    tokenizer: object
    image_token_id: int
    prompt_style: str
    format: str


@dataclass
class PredictResult:
    answer: str
    format: str
    prompt: str


def detect_format(folder: Path) -> str:
    """'training', 'hf' or 'llava', from the files in `folder`; an error names what each format holds."""
    folder = Path(folder)
    if (folder / MODEL_CONFIG).is_file() and (folder / "model.safetensors").is_file():
        return "training"
    if (folder / "text_model_llava" / "config.json").is_file():
        return "llava"
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        if "mm_vision_tower" in config:
            return "llava"
        if config.get("model_type") == "llava":
            return "hf"
    raise ValueError(
        f"{folder} is no model folder this project reads; valid: training (model_config.json + model.safetensors), "
        "hf (config.json with model_type llava), llava (text_model_llava/ or a config.json with mm_vision_tower)"
    )


def _style_of(folder: Path) -> str | None:
    """The prompt style recorded next to a converted or trained model, if any."""
    candidates = (
        (EXPORT_INFO, ("prompt_style",)),
        (IMPORT_INFO, ("prompt_style",)),
        (RUN_CONFIG, ("hdf5", "phase2", "prompt_style")),
    )
    for name, path in candidates:
        f = folder / name
        if f.is_file():
            value = json.loads(f.read_text())
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, str):
                return value
    return None


def load_for_inference(folder: Path, prompt_style: str | None = None) -> InferenceModel:
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from llava_core.model.hf import hf_from_training
    from llava_core.model.llava import load_model
    from llava_core.model.original import load_llava_original

    folder = Path(folder)
    fmt = detect_format(folder)
    if fmt == "hf":
        model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        image_token_id = int(model.config.image_token_index)
    else:
        if fmt == "training":
            model, tok = load_model(folder).eval(), AutoTokenizer.from_pretrained(folder / "tokenizer")
        else:
            model, tok = load_llava_original(folder)
        conv = hf_from_training(model, tok)
        model, tok, image_token_id = conv.model, conv.tokenizer, conv.image_token_id
    if tok.pad_token_id is None and tok.unk_token_id is not None:
        tok.pad_token = tok.unk_token
    style = prompt_style or _style_of(folder) or DEFAULT_STYLE
    check_style(style)
    return InferenceModel(model, tok, image_token_id, style, fmt)


def predict(
    folder: Path,
    image: Path,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    prompt_style: str | None = None,
    suffix: str = "none",
) -> PredictResult:
    """Answer `prompt` about `image` greedily with the model in `folder` (any of FORMATS)."""
    from llava_core.evaluation.evaluate import generate, with_suffix

    if suffix not in PROMPT_SUFFIXES:
        raise ValueError(f"unknown suffix {suffix!r}; valid: {sorted(PROMPT_SUFFIXES)}")
    image = Path(image)
    pil = load_rgb(check_image(image.parent, image.name))
    m = load_for_inference(folder, prompt_style)
    text = with_suffix(prompt, PROMPT_SUFFIXES[suffix])
    [answer] = generate(
        m.model,
        m.tokenizer,
        [text],
        [pil],
        prompt_style=m.prompt_style,
        image_token_id=m.image_token_id,
        batch_size=1,
        max_new_tokens=max_new_tokens,
    )
    return PredictResult(answer, m.format, text)
