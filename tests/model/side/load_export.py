"""Run by a side environment's Python (transformers 4.37 or 4.57, no project code): load one of our exports with
that release's own classes and write what it found to a torch file the test compares with the main environment.

    python load_export.py hf <models/hf> <image.png> <out.pt> [<tokenizer folder> ...]
    python load_export.py llava <models/llava> <image.png> <out.pt> [<tokenizer folder> ...]

`hf`: LlavaForConditionalGeneration.from_pretrained (missing / unexpected keys), AutoTokenizer, AutoProcessor (in
4.37 the processor is built from its parts when AutoProcessor refuses the folder, and the refusal is reported),
the chat template as the processor and the tokenizer render it, and the logits of the documented two-step use
(render, then the processor) on one image.

`llava`: the steps of LLaVA's `load_pretrained_model` for a Llama-based model, re-implemented from its documented
behaviour: the tokenizer as `AutoTokenizer.from_pretrained(path, use_fast=False)`; the config of `model_type: llava`
read as a LlamaConfig subclass carrying the `mm_*` keys; the language model with an `mm_projector`
(Linear-GELU-Linear for `mlp2x_gelu`) loaded from the text folder; `resize_token_embeddings(len(tokenizer))`; the
vision tower and its image processor from `mm_vision_tower`; a prompt split at `<image>` with each piece tokenised
by itself (BOS on the first piece only) and the image index -200 between; the image features (`hidden_states`
at `mm_vision_select_layer`, CLS dropped, projected) put in place of -200 for the logits.

Further tokenizer folders are loaded the way the mode loads its tokenizer and tokenise TEXTS (`families`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import transformers
from PIL import Image

CONV = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]},
]
MULTI_TURN = CONV + [
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": [{"type": "text", "text": "Is there a square?"}]},
]
TEXTS = ["What color is the circle?", " two  spaces", "USER: <image>\nIs there a square? ASSISTANT:", "a\n  b </s>"]
LLAVA_IMAGE_INDEX = -200  # LLaVA's IMAGE_TOKEN_INDEX


def loading_info(info: dict) -> dict:
    return {k: sorted(str(x) for x in v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys")}


def hf(folder: str, image: Image.Image, *tokenizers: str) -> dict:
    from transformers import (
        AutoProcessor,
        AutoTokenizer,
        CLIPImageProcessor,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    tok = AutoTokenizer.from_pretrained(folder)
    out = {"loading": loading_info(info), "tokenizer_class": type(tok).__name__}
    out["text_ids"] = [tok(t).input_ids for t in TEXTS]
    try:
        processor = AutoProcessor.from_pretrained(folder)
        out["auto_processor_error"] = None
    except TypeError as e:  # 4.37: a processor_config.json with the keys 4.45+ need
        out["auto_processor_error"] = str(e)
        processor = LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(folder), tokenizer=tok)
    out["image_processor_class"] = type(processor.image_processor).__name__
    rendered = {}
    for name, conv in (("single", CONV), ("multi_turn", MULTI_TURN)):
        for gen in (True, False):
            rendered[f"tokenizer/{name}/{gen}"] = tok.apply_chat_template(
                conv, add_generation_prompt=gen, tokenize=False
            )
            if getattr(processor, "chat_template", None):
                rendered[f"processor/{name}/{gen}"] = processor.apply_chat_template(conv, add_generation_prompt=gen)
    out["rendered"] = rendered
    prompt = rendered["tokenizer/single/True"]
    batch = processor(text=prompt, images=image, return_tensors="pt")
    out["input_ids"] = batch["input_ids"][0].tolist()
    out["pixel_values"] = batch["pixel_values"]
    with torch.no_grad():
        out["logits"] = model.eval()(**batch).logits
    out["families"] = {Path(t).name: [AutoTokenizer.from_pretrained(t)(x).input_ids for x in TEXTS] for t in tokenizers}
    return out


def llava_layout_ids(tok, prompt: str) -> list[int]:
    """LLaVA's `tokenizer_image_token`, from its behaviour: each piece between `<image>`s tokenised by itself, the
    BOS of the pieces after the first dropped, the image index between the pieces."""
    pieces = [tok(piece).input_ids for piece in prompt.split("<image>")]
    ids = list(pieces[0])
    for more in pieces[1:]:
        if tok.bos_token_id is not None and more[:1] == [tok.bos_token_id]:
            more = more[1:]
        ids += [LLAVA_IMAGE_INDEX, *more]
    return ids


def projector(config) -> torch.nn.Sequential:
    import re

    depth = int(re.fullmatch(r"mlp(\d+)x_gelu", config.mm_projector_type).group(1))
    layers = [torch.nn.Linear(config.mm_hidden_size, config.hidden_size)]
    for _ in range(depth - 1):
        layers += [torch.nn.GELU(), torch.nn.Linear(config.hidden_size, config.hidden_size)]
    return torch.nn.Sequential(*layers)


def llava(folder: str, image: Image.Image, *tokenizers: str) -> dict:
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaModel,
    )

    class LlavaConfig(LlamaConfig):
        model_type = "llava_llama"

    class LlavaLlamaModel(LlamaModel):
        config_class = LlavaConfig

        def __init__(self, config):
            super().__init__(config)
            self.mm_projector = projector(config)

    class LlavaLlamaForCausalLM(LlamaForCausalLM):
        config_class = LlavaConfig

        def __init__(self, config):
            super(LlamaForCausalLM, self).__init__(config)
            self.model = LlavaLlamaModel(config)
            self.vocab_size = config.vocab_size
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

    # LLaVA's scripts run from inside the export folder: `mm_vision_tower` (image_model) is found from there
    os.chdir(folder)
    model_path = "text_model_llava"
    name = Path(model_path).name  # get_model_name_from_path: the last path part
    assert "llava" in name.lower() and "mistral" not in name.lower() and "mpt" not in name.lower(), name
    tok = AutoTokenizer.from_pretrained(model_path, use_fast=False)
    config = LlavaConfig.from_pretrained(model_path)
    model, info = LlavaLlamaForCausalLM.from_pretrained(model_path, low_cpu_mem_usage=True, output_loading_info=True)
    out = {"loading": loading_info(info), "tokenizer_class": type(tok).__name__, "len_tokenizer": len(tok)}
    out["config"] = {k: getattr(config, k, None) for k in ("mm_vision_tower", "mm_hidden_size", "mm_projector_type")}
    out["config"].update(
        vocab_size=config.vocab_size, rope_theta=config.rope_theta, use_im_patch=config.mm_use_im_patch_token
    )
    rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok))
    out["embedding_rows"] = [rows, model.get_input_embeddings().weight.shape[0]]
    tower_path = config.mm_vision_tower
    CLIPVisionConfig.from_pretrained(tower_path)  # the delay-loaded tower reads its config first
    tower, tower_info = CLIPVisionModel.from_pretrained(tower_path, output_loading_info=True)
    out["tower_loading"] = loading_info(tower_info)
    pixels = CLIPImageProcessor.from_pretrained(tower_path)(image, return_tensors="pt")["pixel_values"]
    prompt = "USER: <image>\nWhat color is the circle? ASSISTANT:"
    ids = llava_layout_ids(tok, prompt)
    out["ids"], out["plain_ids"] = ids, [tok(t).input_ids for t in TEXTS]
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[config.mm_vision_select_layer][:, 1:]
        feats = model.model.mm_projector(hidden)[0]
        at = ids.index(LLAVA_IMAGE_INDEX)
        embed = model.get_input_embeddings()
        parts = [embed(torch.tensor(ids[:at])), feats, embed(torch.tensor(ids[at + 1 :]))]
        out["logits"] = model.eval()(inputs_embeds=torch.cat(parts)[None]).logits
    out["image_position"] = at
    out["families"] = {
        Path(t).name: [AutoTokenizer.from_pretrained(t, use_fast=False)(x).input_ids for x in TEXTS] for t in tokenizers
    }
    return out


def main() -> None:
    mode, folder, image, dest, *more = sys.argv[1:]
    result = {"hf": hf, "llava": llava}[mode](folder, Image.open(image).convert("RGB"), *more)
    result["versions"] = {"transformers": transformers.__version__, "tokenizers": __import__("tokenizers").__version__}
    torch.save(result, dest)
    print(result["versions"], result["loading"])


if __name__ == "__main__":
    main()
