"""Checkpoint conversion: the HF model loads with transformers alone and gives the training model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from llava_core.checkpoint import HF_KEY_MAP, export_hf, from_hf_state_dict, to_hf_state_dict
from llava_core.config import load_config
from llava_core.images import clip_transform
from llava_core.model import build_model, load_model, save_model
from llava_core.prompts import encode_conversation
from llava_core.tokenizer import load_tokenizer


@pytest.fixture
def trained_like_checkpoint(small_params):
    """A phase-2 checkpoint folder (random weights, perturbed so no tensor keeps its init) as training writes it."""
    cfg = load_config(small_params)
    tok = load_tokenizer(cfg.resolve_file(cfg.model.tokenizer))
    model = build_model(cfg, len(tok), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    folder = cfg.checkpoint_dir("phase2")
    save_model(model, folder)
    tok.save_pretrained(folder / "tokenizer")
    (folder / "train_summary.json").write_text(json.dumps({"image_patch_start_idx": 28}))
    return cfg, folder


def test_key_map_round_trip_is_exact(trained_like_checkpoint):
    cfg, folder = trained_like_checkpoint
    state = load_model(folder).state_dict()
    hf_state = to_hf_state_dict(state)
    assert all(any(k.startswith(dst) for _, dst in HF_KEY_MAP) for k in hf_state)
    back = from_hf_state_dict(hf_state)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_hf_export_loads_with_transformers_and_matches_logits(trained_like_checkpoint):
    cfg, folder = trained_like_checkpoint
    result = export_hf(cfg)
    model = load_model(folder).eval()
    hf = LlavaForConditionalGeneration.from_pretrained(result.path).eval()
    tok = AutoTokenizer.from_pretrained(result.path)
    assert tok.convert_tokens_to_ids("<image>") == hf.config.image_token_index == result.image_token_id

    # every weight bit-identical after the save/load through the HF folder
    loaded = hf.state_dict()
    expected = to_hf_state_dict(model.state_dict())
    assert expected.keys() == loaded.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key

    conv = [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"}]
    enc = encode_conversation(conv, tok, "vicuna_v1", model.num_patches, tok.pad_token_id)
    ids = torch.tensor([enc.input_ids, enc.input_ids])
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        ours, _ = model(ids, torch.ones_like(ids), pixels, torch.tensor([True, True]), enc.image_start)
        hf_ids = ids.clone()
        hf_ids[:, enc.image_start : enc.image_start + model.num_patches] = result.image_token_id
        theirs = hf(input_ids=hf_ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
    assert ours.shape == theirs.shape == (2, len(enc.input_ids), len(tok))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the images matter: a different image changes the logits after the slots
    with torch.no_grad():
        other, _ = model(
            ids,
            torch.ones_like(ids),
            torch.randn(2, 3, 32, 32, generator=g),
            torch.tensor([True, True]),
            enc.image_start,
        )
    assert not torch.allclose(other[:, -1], ours[:, -1])


def test_hf_processor_pixels_equal_training_transform(trained_like_checkpoint, tmp_path):
    from PIL import Image

    cfg, _ = trained_like_checkpoint
    result = export_hf(cfg)
    processor = AutoProcessor.from_pretrained(result.path)
    img = Image.new("RGB", (50, 30), (200, 30, 30))
    theirs = processor.image_processor(img, return_tensors="pt")["pixel_values"][0]
    ours = clip_transform(img, 32)
    assert theirs.shape == ours.shape == (3, 32, 32)
    torch.testing.assert_close(theirs, ours, atol=0.05, rtol=0)


def test_export_refuses_unfinished_checkpoint(small_params):
    cfg = load_config(small_params)
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        export_hf(cfg)
