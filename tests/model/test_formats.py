"""Checkpoint conversion: HF and original-LLaVA exports load with transformers alone, give the training model's
logits, and convert back to the training format with every weight bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from llava_core.data.images import clip_transform
from llava_core.data.prompts import SYSTEM_PROMPTS, encode_conversation
from llava_core.data.tokenizer import load_tokenizer
from llava_core.model.hf import HF_KEY_MAP, export_hf, from_hf_state_dict, import_hf, read_hf, to_hf_state_dict
from llava_core.model.llava import load_model
from llava_core.model.original import (
    LLAVA_KEY_MAP,
    export_llava,
    from_llava_state_dict,
    import_llava,
    load_llava_original,
    to_llava_state_dict,
)
from llava_core.model.weights import load_weights, pad_vocab, trim_vocab
from llava_core.params import load_config
from tests.helpers_models import write_checkpoint
from tests.helpers_unit import TINY_TOKENIZER


@pytest.fixture
def trained_like_checkpoint(small_params):
    cfg = load_config(small_params)
    return cfg, write_checkpoint(cfg, load_tokenizer(cfg.resolve_file(cfg.model.tokenizer)))


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


# --- helpers ---------------------------------------------------------------------------------------------------


def assert_same_weights(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


def training_logits(model, tok, image_token_id=None, seed=0):
    """(logits, hf-ready ids, pixels) of a two-image batch through the training model."""
    conv = [{"from": "human", "value": "<image>\nWhere is the square?"}, {"from": "gpt", "value": "top left"}]
    enc = encode_conversation(conv, tok, "vicuna_v1", model.num_patches, tok.pad_token_id)
    ids = torch.tensor([enc.input_ids, enc.input_ids])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, _ = model(ids, torch.ones_like(ids), pixels, torch.tensor([True, True]), enc.image_start)
    hf_ids = ids.clone()
    if image_token_id is not None:
        hf_ids[:, enc.image_start : enc.image_start + model.num_patches] = image_token_id
    return logits, hf_ids, pixels


VOCAB = len(AutoTokenizer.from_pretrained(TINY_TOKENIZER))  # the tiny tokenizer's vocabulary (with <image>)
PADDED = -(-(VOCAB + 1) // 64) * 64  # llava-hf pads the embeddings to a multiple of 64
IMAGE_START = 1 + len(SYSTEM_PROMPTS["vicuna_v1"].split()) + 2  # BOS, the system prompt's words, "USER:", "▁"


@pytest.fixture
def tokenizer_without_image_token(tmp_path):
    """The tiny tokenizer with `<image>` renamed away: a base vocabulary of VOCAB that lacks it (like Vicuna's)."""
    from pathlib import Path

    src, dst = Path(TINY_TOKENIZER), tmp_path / "tok_no_image"
    dst.mkdir()
    tj = json.loads((src / "tokenizer.json").read_text())
    for t in tj["added_tokens"]:
        if t["content"] == "<image>":
            t["content"] = "<unused0>"
    vocab = tj["model"]["vocab"]
    vocab["<unused0>"] = vocab.pop("<image>")
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc.pop("image_token")
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    tok = AutoTokenizer.from_pretrained(dst)
    assert len(tok) == VOCAB and tok.convert_tokens_to_ids("<image>") == tok.unk_token_id
    return tok


# --- pure state-dict functions ---------------------------------------------------------------------------------


def test_llava_key_map_names_the_original_repo_keys():
    w = {
        "image_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(1),
        "projector.0.weight": torch.ones(1),
        "projector.2.bias": torch.full((1,), 2.0),
        "text_model.model.layers.0.self_attn.q_proj.weight": torch.full((1,), 3.0),
        "text_model.model.norm.weight": torch.full((1,), 4.0),
        "text_model.lm_head.weight": torch.full((1,), 5.0),
    }
    parts = to_llava_state_dict(w)
    assert set(parts["image_model"]) == {"vision_model.encoder.layers.0.mlp.fc1.weight"}
    assert set(parts["text_model_llava"]) == {
        "model.mm_projector.0.weight",
        "model.mm_projector.2.bias",
        "model.layers.0.self_attn.q_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    }
    # back: `model.mm_projector.*` is the projector, not the language model's `model.*`
    back = from_llava_state_dict(parts)
    assert back.keys() == w.keys()
    assert all(torch.equal(back[k], w[k]) for k in w)
    assert len(LLAVA_KEY_MAP) == 5


def test_unmapped_key_is_an_error():
    with pytest.raises(KeyError, match="no mapping for parameter 'vision_resampler.weight'"):
        to_hf_state_dict({"vision_resampler.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="model.image_newline"):
        from_hf_state_dict({"model.image_newline": torch.zeros(1)})
    with pytest.raises(KeyError, match="image_model/text_model.embeddings"):  # a full CLIP's text tower
        from_llava_state_dict({"image_model": {"text_model.embeddings.x": torch.zeros(1)}})


def test_pad_and_trim_vocab():
    emb = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    state = {"text_model.model.embed_tokens.weight": emb, "text_model.lm_head.weight": 2 * emb, "x": torch.ones(1)}
    padded = pad_vocab(state, 4)
    # new rows are the mean of the old ones: (2, 4) for the embeddings, (4, 8) for the head
    assert torch.equal(padded["text_model.model.embed_tokens.weight"][2:], torch.tensor([[2.0, 4.0], [2.0, 4.0]]))
    assert torch.equal(padded["text_model.lm_head.weight"][2:], torch.tensor([[4.0, 8.0], [4.0, 8.0]]))
    assert padded["x"] is state["x"]
    back = trim_vocab(padded, 2)
    assert all(torch.equal(back[k], state[k]) for k in state)


# --- training <-> Hugging Face ---------------------------------------------------------------------------------


def test_training_hf_training_round_trip_is_bit_identical(trained_like_checkpoint, tmp_path):
    from safetensors.torch import load_file

    cfg, folder = trained_like_checkpoint
    hf_dir = export_hf(cfg).path
    result = import_hf(hf_dir, tmp_path / "imported")
    assert result.trimmed_rows == 0 and result.vocab_size == VOCAB
    # the files themselves: same keys, dtypes and bits
    assert_same_weights(load_file(folder / "model.safetensors"), load_file(result.path / "model.safetensors"))
    model = load_model(result.path)  # the folder alone rebuilds the model
    assert model.vision_feature_layer == -2 and model.num_patches == 64
    # a finished checkpoint: export takes it again, and HF -> training -> HF is bit-identical as well
    summary = json.loads((result.path / "train_summary.json").read_text())
    tok = AutoTokenizer.from_pretrained(result.path / "tokenizer")
    enc = encode_conversation([{"from": "human", "value": "<image>\nx"}], tok, "vicuna_v1", 64, 0, True)
    assert summary["image_patch_start_idx"] == enc.image_start == IMAGE_START
    assert tok.encode("What color is the circle?") == AutoTokenizer.from_pretrained(folder / "tokenizer").encode(
        "What color is the circle?"
    )
    first = LlavaForConditionalGeneration.from_pretrained(hf_dir).state_dict()
    folder2 = cfg.checkpoint_dir("phase2")
    import shutil

    shutil.rmtree(folder2)
    shutil.copytree(result.path, folder2)
    second = LlavaForConditionalGeneration.from_pretrained(export_hf(cfg).path).state_dict()
    assert_same_weights(first, second)


def test_image_token_added_past_the_vocab_pads_like_llava_hf_and_imports_back(
    small_params, tokenizer_without_image_token, tmp_path
):
    from PIL import Image
    from safetensors.torch import load_file

    cfg = load_config(small_params)
    folder = write_checkpoint(cfg, tokenizer_without_image_token)
    result = export_hf(cfg)
    assert result.image_token_id == VOCAB
    info = json.loads((result.path / "export_info.json").read_text())
    assert info["original_vocab_size"] == VOCAB and info["added_tokens"] == ["<image>"]
    hf = LlavaForConditionalGeneration.from_pretrained(result.path).eval()
    assert hf.config.text_config.vocab_size == PADDED  # VOCAB + 1 rounded up to a multiple of 64
    tok = AutoTokenizer.from_pretrained(result.path)
    assert len(tok) == VOCAB + 1 and tok.convert_tokens_to_ids("<image>") == VOCAB == hf.config.image_token_index
    # the processor expands <image> into the image slots
    processor = AutoProcessor.from_pretrained(result.path)
    batch = processor(
        text="USER: <image>\nWhat is it? ASSISTANT:", images=Image.new("RGB", (32, 32)), return_tensors="pt"
    )
    assert int((batch["input_ids"] == VOCAB).sum()) == 64

    model = load_model(folder).eval()
    ours, hf_ids, pixels = training_logits(model, tokenizer_without_image_token, image_token_id=VOCAB)
    with torch.no_grad():
        theirs = hf(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=pixels).logits
    assert theirs.shape[-1] == PADDED
    torch.testing.assert_close(theirs[..., :VOCAB], ours, rtol=1e-5, atol=1e-5)

    # import: the padded rows and the added token go again; every weight is the original's
    back = import_hf(result.path, tmp_path / "imported")
    assert back.trimmed_rows == PADDED - VOCAB and back.vocab_size == VOCAB
    assert_same_weights(load_file(folder / "model.safetensors"), load_file(back.path / "model.safetensors"))
    tok_back = AutoTokenizer.from_pretrained(back.path / "tokenizer")
    assert len(tok_back) == VOCAB and tok_back.convert_tokens_to_ids("<image>") == tok_back.unk_token_id
    assert json.loads((back.path / "import_info.json").read_text())["removed_tokens"] == ["<image>"]


def test_import_of_a_foreign_hf_folder_keeps_its_padded_vocab(small_params, tokenizer_without_image_token, tmp_path):
    """A llava-hf folder (no export_info.json): rows and <image> stay, so HF -> training -> HF is exact."""
    cfg = load_config(small_params)
    write_checkpoint(cfg, tokenizer_without_image_token)
    hf_dir = export_hf(cfg).path
    (hf_dir / "export_info.json").unlink()
    back = import_hf(hf_dir, tmp_path / "imported")
    assert back.trimmed_rows == 0 and back.vocab_size == PADDED
    tok = AutoTokenizer.from_pretrained(back.path / "tokenizer")
    assert tok.convert_tokens_to_ids("<image>") == VOCAB
    expected = LlavaForConditionalGeneration.from_pretrained(hf_dir).state_dict()
    assert_same_weights(from_hf_state_dict(expected), load_model(back.path).state_dict())


def test_import_rejects_an_unsupported_hf_layout(trained_like_checkpoint, tmp_path):
    cfg, _ = trained_like_checkpoint
    hf_dir = export_hf(cfg).path
    config = json.loads((hf_dir / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'full' \\(supported: 'default'\\)"):
        read_hf(hf_dir)
    assert not (tmp_path / "imported").exists()


# --- training <-> original LLaVA -------------------------------------------------------------------------------


def test_original_llava_layout_and_config(trained_like_checkpoint, monkeypatch):
    import os

    from PIL import Image
    from transformers import AutoImageProcessor, CLIPImageProcessor, CLIPVisionModel

    cfg, folder = trained_like_checkpoint
    result = export_llava(cfg)
    out = cfg.path("models") / "llava"
    assert result.path == out and not out.with_name(".llava.partial").exists()
    config = json.loads((out / "text_model_llava/config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert {k: config[k] for k in config if k.startswith("mm_") or k == "image_aspect_ratio"} == {
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": 64,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_vision_tower": "image_model",  # relative to the export folder: no absolute path in the output
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
    }
    assert config["vocab_size"] == VOCAB and config["hidden_size"] == 128
    model = load_model(folder)
    text = load_weights(out / "text_model_llava")  # through model.safetensors.index.json
    state = model.state_dict()
    assert torch.equal(text["model.mm_projector.0.weight"], state["projector.0.weight"])
    assert torch.equal(text["model.mm_projector.2.bias"], state["projector.2.bias"])
    assert torch.equal(text["model.embed_tokens.weight"], state["text_model.model.embed_tokens.weight"])
    assert torch.equal(text["lm_head.weight"], state["text_model.lm_head.weight"])
    assert not any(k.startswith(("image_model", "vision", "model.vision_tower")) for k in text)
    # the vision tower: a CLIPVisionModel folder transformers loads, file keys as CLIPVisionModel wrote them in 4.x
    image_file = load_weights(out / "image_model")
    assert all(k.startswith("vision_model.") for k in image_file)
    tower = CLIPVisionModel.from_pretrained(out / "image_model")
    assert_same_weights(model.image_model.state_dict(), tower.state_dict())
    processor = AutoImageProcessor.from_pretrained(out / "image_model")
    img = Image.new("RGB", (48, 48), (20, 120, 220))
    pixels = processor(img, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels, clip_transform(img, 32), atol=0.05, rtol=0)
    tok = AutoTokenizer.from_pretrained(out / "text_model_llava")
    assert len(tok) == VOCAB and tok.eos_token_id == 2
    # LLaVA's own rule (llava/model/multimodal_encoder/builder.py, clip_encoder.py): mm_vision_tower is taken when
    # os.path.exists() finds it, then CLIPImageProcessor / CLIPVisionModel.from_pretrained(mm_vision_tower), all
    # from the working directory: run from inside the export folder, the relative name loads the tower
    monkeypatch.chdir(out)
    tower_name = config["mm_vision_tower"]
    assert os.path.exists(tower_name) and not os.path.isabs(tower_name)
    assert_same_weights(model.image_model.state_dict(), CLIPVisionModel.from_pretrained(tower_name).state_dict())
    assert CLIPImageProcessor.from_pretrained(tower_name).crop_size["height"] == 32


def test_training_original_training_round_trip_is_bit_identical(trained_like_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file

    cfg, folder = trained_like_checkpoint
    out = export_llava(cfg).path
    model, tok = load_llava_original(out)
    original = load_model(folder).eval()
    assert_same_weights(original.state_dict(), model.state_dict())
    assert model.vision_feature_layer == -2
    # the rebuilt architecture computes the same function (configs survived the trip, not only the weights)
    ours, ids, pixels = training_logits(original, tok)
    theirs, _, _ = training_logits(model, tok)
    assert torch.equal(ours, theirs)
    # also from the text folder alone, and after the export moved (mm_vision_tower then names a gone path)
    moved = tmp_path / "elsewhere" / "llava"
    shutil.move(str(out), moved)
    model2, _ = load_llava_original(moved / "text_model_llava")
    assert_same_weights(original.state_dict(), model2.state_dict())
    # to a training folder on disk: the same bits as the checkpoint it came from
    back = import_llava(moved, tmp_path / "from_llava")
    assert_same_weights(load_file(folder / "model.safetensors"), load_file(back.path / "model.safetensors"))
    assert json.loads((back.path / "train_summary.json").read_text())["image_patch_start_idx"] == IMAGE_START


def test_original_bin_weights_are_read_with_weights_only(trained_like_checkpoint):
    cfg, folder = trained_like_checkpoint
    text_dir = export_llava(cfg).path / "text_model_llava"
    weights = load_weights(text_dir)
    for f in text_dir.glob("model*"):
        f.unlink()
    torch.save(weights, text_dir / "pytorch_model.bin")
    model, _ = load_llava_original(text_dir.parent)
    assert_same_weights(load_model(folder).state_dict(), model.state_dict())
    # a pickle that needs more than tensors is refused (weights_only=True)
    torch.save({"model.norm.weight": weights["model.norm.weight"], "x": object()}, text_dir / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_llava_original(text_dir.parent)


def test_original_config_checks(trained_like_checkpoint):
    cfg, _ = trained_like_checkpoint
    text_dir = export_llava(cfg).path / "text_model_llava"
    config = json.loads((text_dir / "config.json").read_text())
    config["mm_projector_type"] = "linear"
    (text_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mm_projector_type 'linear' \\(supported: 'mlp2x_gelu'\\)"):
        load_llava_original(text_dir)


def test_export_llava_refuses_unfinished_checkpoint(small_params):
    cfg = load_config(small_params)
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        export_llava(cfg)
