"""Our exports loaded by the other side's released packages, in side environments built from the package index:
transformers 4.37.2 and 4.57.1 load `models/hf` with no missing or unexpected key and give the logits of the
transformers-5 load of the same folder; LLaVA's pinned stack (transformers 4.37.2, tokenizers 0.15.1) loads
`models/llava` the way LLaVA's `load_pretrained_model` does and tokenises as our tokenizer does. The side runs
(tests/model/side/load_export.py) report what they found; the figures are printed (`pytest -s`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_core.data.images import clip_transform
from llava_core.data.tokenizer import load_tokenizer
from llava_core.model.hf import export_hf
from llava_core.model.llava import load_model
from llava_core.model.original import export_llava
from llava_core.model.weights import write_classic_tokenizer
from llava_core.params import load_config
from tests.helpers_models import write_checkpoint
from tests.helpers_sidevenv import run_side, side_python
from tests.helpers_tokenizers import build_tokenizer_folder
from tests.helpers_unit import base_params, write_params

pytestmark = [pytest.mark.network, pytest.mark.slow]
SIDE = Path(__file__).parent / "side" / "load_export.py"
VERSIONS = {"transformers-4.37": "4.37.2", "transformers-4.57": "4.57.1"}
# the side script's two conversations (side/load_export.py) as llava-hf's template renders them
CONV = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
SINGLE_TEXT = "USER: <image>\nWhat color is the circle? "
MULTI_TURN_TEXT = SINGLE_TEXT + "ASSISTANT: red USER: Is there a square? "
# the side script's texts
TEXTS = ["What color is the circle?", " two  spaces", "USER: <image>\nIs there a square? ASSISTANT:", "a\n  b </s>"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny finished checkpoint exported both ways with a 1 MB shard limit (the 4.5 MB model shards), an image,
    and the transformers-5 facts of the HF folder: loading info, the two-step inputs and their logits."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("side_exports")
    params = base_params(root)
    params["export"] = {"max_shard_size": "1MB"}
    cfg = load_config(write_params(root, params))
    tok = load_tokenizer(cfg.resolve_file(cfg.model.tokenizer))
    ckpt = write_checkpoint(cfg, tok)
    hf_dir, llava_dir = export_hf(cfg).path, export_llava(cfg).path
    assert len(json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    image = root / "square.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    model, info = LlavaForConditionalGeneration.from_pretrained(hf_dir, output_loading_info=True)
    processor = AutoProcessor.from_pretrained(hf_dir)
    prompt = processor.apply_chat_template(CONV, add_generation_prompt=True)
    batch = processor(text=prompt, images=Image.open(image), return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    main = {"loading": info, "input_ids": batch["input_ids"][0].tolist(), "pixels": batch["pixel_values"]}
    return {"cfg": cfg, "ckpt": ckpt, "hf": hf_dir, "llava": llava_dir, "image": image, "main": main, "logits": logits}


def tokenizer_families(folder: Path, kinds: tuple[str, ...]) -> dict[str, list[list[int]]]:
    """Llama-style tokenizers as transformers 5 holds them (its Metaspace pipeline) written by the exports' writer
    into `folder/<kind>`; their ids for TEXTS in the main environment."""
    from transformers import AutoTokenizer

    ids = {}
    for kind in kinds:
        tok = AutoTokenizer.from_pretrained(build_tokenizer_folder(folder / f"src_{kind}", kind))
        write_classic_tokenizer(tok, folder / kind)
        ids[kind] = [tok(t).input_ids for t in TEXTS]
    return ids


def collapse_image_run(ids: list[int], image_id: int) -> list[int]:
    """The ids with each run of image tokens as one (4.37 expands `<image>` in the model, not the processor)."""
    return [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]


@pytest.mark.parametrize("env", list(VERSIONS))
def test_hf_export_loads_in_transformers_4x_with_the_transformers_5_logits(exports, env, tmp_path):
    python = side_python(env)
    out = tmp_path / "side.pt"
    # tokenizers 0.15 parses no non-legacy (Mistral-style) pipeline: docs/limits.md
    kinds = ("llama", "llama_pad") if env == "transformers-4.37" else ("llama", "mistral", "llama_pad")
    families = tokenizer_families(tmp_path, kinds)
    args = [str(exports["hf"]), str(exports["image"]), str(out), *(str(tmp_path / k) for k in families)]
    run_side(python, SIDE, "hf", *args)
    side = torch.load(out, weights_only=True)
    main = exports["main"]
    assert side["versions"]["transformers"] == VERSIONS[env]
    assert not main["loading"]["missing_keys"] and not main["loading"]["unexpected_keys"]
    assert side["loading"] == {"missing_keys": [], "unexpected_keys": []}
    assert side["tokenizer_class"] == "LlamaTokenizerFast"
    assert side["families"] == families
    # the chat template, through the processor (4.57) and the tokenizer (both): llava-hf's text, no BOS, no </s>
    for key, text in side["rendered"].items():
        _, conv, gen = key.split("/")
        want = (SINGLE_TEXT if conv == "single" else MULTI_TURN_TEXT) + ("ASSISTANT:" if gen == "True" else "")
        assert text == want, key
    image_id = json.loads((exports["hf"] / "config.json").read_text())["image_token_index"]
    if env == "transformers-4.37":
        # 4.37's LlavaProcessor takes no keyword from processor_config.json (llava-hf's folders are refused the same
        # way); its parts load, and its model expands the one `<image>` itself
        assert "unexpected keyword argument" in side["auto_processor_error"]
        assert side["input_ids"] == collapse_image_run(main["input_ids"], image_id)
    else:
        assert side["auto_processor_error"] is None
        assert side["input_ids"] == main["input_ids"]
    assert side["input_ids"][0] == 1 and side["input_ids"].count(1) == 1  # one BOS in the two-step use
    torch.testing.assert_close(side["pixel_values"], main["pixels"], atol=1e-5, rtol=0)
    diff = (side["logits"] - exports["logits"]).abs().max().item()
    print(f"\n{env}: missing 0, unexpected 0, max |logit difference| against transformers 5: {diff:.2e}")
    assert side["logits"].shape == exports["logits"].shape
    torch.testing.assert_close(side["logits"], exports["logits"], atol=1e-4, rtol=1e-4)


def test_llava_pinned_stack_loads_the_original_export_like_load_pretrained_model(exports, tmp_path):
    python = side_python("transformers-4.37")
    out = tmp_path / "side.pt"
    families = tokenizer_families(tmp_path, ("llama", "llama_pad"))
    args = [str(exports["llava"]), str(exports["image"]), str(out), *(str(tmp_path / k) for k in families)]
    run_side(python, SIDE, "llava", *args)
    side = torch.load(out, weights_only=True)
    assert side["versions"] == {"transformers": "4.37.2", "tokenizers": "0.15.1"}
    assert side["loading"] == {"missing_keys": [], "unexpected_keys": []}
    assert side["tower_loading"] == {"missing_keys": [], "unexpected_keys": []}
    assert side["tokenizer_class"] == "LlamaTokenizerFast"  # `use_fast=False` still takes the named ...Fast class
    model = load_model(exports["ckpt"]).eval()
    rows = model.text_model.get_input_embeddings().num_embeddings
    assert side["len_tokenizer"] == rows and side["embedding_rows"] == [rows, rows]  # no resize
    assert side["config"]["mm_vision_tower"] == "image_model"  # relative: found from inside models/llava
    assert side["config"]["mm_hidden_size"] == model.image_model.config.hidden_size
    assert side["config"]["use_im_patch"] is False and side["config"]["vocab_size"] == rows
    # the same ids as our tokenizer in the main environment, plain and in LLaVA's image layout
    tok = load_tokenizer(exports["cfg"].resolve_file(exports["cfg"].model.tokenizer))
    assert side["plain_ids"] == [tok(t).input_ids for t in TEXTS]
    assert side["families"] == families
    head, tail = "USER: <image>\nWhat color is the circle? ASSISTANT:".split("<image>")
    want = tok(head).input_ids + [-200] + tok(tail).input_ids[1:]
    assert side["ids"] == want
    # LLaVA's forward on that layout is the training model's with the image slots at the same place
    at = side["image_position"]
    ids = want[:at] + [tok.pad_token_id] * model.num_patches + want[at + 1 :]
    enc = torch.tensor([ids])
    pixels = clip_transform(Image.open(exports["image"]), model.image_model.config.image_size)[None]
    with torch.no_grad():
        ours, _ = model(enc, torch.ones_like(enc), pixels, torch.tensor([True]), at)
    diff = (side["logits"] - ours).abs().max().item()
    print(
        f"\nLLaVA's loader under 4.37.2 / tokenizers 0.15.1: missing 0, unexpected 0, max |logit difference| {diff:.2e}"
    )
    torch.testing.assert_close(side["logits"], ours, atol=1e-4, rtol=1e-4)
