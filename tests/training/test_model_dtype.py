"""`model.dtype`: pretrained weights stored in fp16 (as Vicuna-v1.5's are) are held in fp32 for training, or in
bf16 when asked; the training run records the dtype in train_summary.json."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from llava_core import pipeline
from llava_core.config import ConfigError
from llava_core.data.tokenizer import load_tokenizer
from llava_core.model.llava import build_model, parameter_dtype
from llava_core.params import load_config
from llava_core.presets import TINY_TOKENIZER, tiny
from llava_core.training.recipe import Recipe
from tests.helpers_unit import base_params, write_params


@pytest.fixture(scope="module")
def fp16_folders(tmp_path_factory):
    """A tiny CLIP vision tower and Llama LM (the tiny preset's shapes) saved by save_pretrained in fp16."""
    root = tmp_path_factory.mktemp("fp16_pretrained")
    preset = tiny()["model"]
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(**preset["vision_config"])).half()
    vocab = len(load_tokenizer(str(TINY_TOKENIZER)))
    text = LlamaForCausalLM(LlamaConfig(**preset["text_config"], vocab_size=vocab)).half()
    vision.save_pretrained(root / "clip")
    text.save_pretrained(root / "llama")
    return root / "clip", root / "llama"


def _params(root, folders, **model) -> dict:
    params = base_params(root)
    params["model"].update(
        vision_pretrained=str(folders[0]),
        vision_config=None,
        text_pretrained=str(folders[1]),
        text_config=None,
        **model,
    )
    return params


def _build(cfg):
    tok = load_tokenizer(cfg.resolve_file(cfg.model.tokenizer))
    return build_model(cfg, len(tok), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})


@pytest.mark.parametrize(
    "dtype, expected", [(None, torch.float32), ("float32", torch.float32), ("bfloat16", torch.bfloat16)]
)
def test_fp16_pretrained_weights_are_held_in_the_configured_dtype(tmp_path, fp16_folders, dtype, expected):
    extra = {} if dtype is None else {"dtype": dtype}
    cfg = load_config(write_params(tmp_path, _params(tmp_path, fp16_folders, **extra)))
    assert cfg.model.dtype == (dtype or "float32")
    model = _build(cfg)
    assert {p.dtype for p in model.parameters()} == {expected}  # towers and projector alike
    assert parameter_dtype(model) == str(expected).removeprefix("torch.")
    # the values are the stored fp16 values (exactly representable in fp32)
    stored = LlamaForCausalLM.from_pretrained(fp16_folders[1], dtype=torch.float16)
    emb = stored.get_input_embeddings().weight
    assert emb.dtype == torch.float16
    ours = model.text_model.get_input_embeddings().weight
    if expected == torch.float32:
        assert torch.equal(ours, emb.float())
    else:
        assert torch.equal(ours, emb.to(torch.bfloat16))


def test_unknown_dtype_is_a_clear_error(tmp_path, fp16_folders):
    with pytest.raises(ConfigError) as ei:
        load_config(write_params(tmp_path, _params(tmp_path, fp16_folders, dtype="float16")))
    assert "model.dtype" in str(ei.value) and "'float32'" in str(ei.value) and "'bfloat16'" in str(ei.value)


def test_pure_bf16_training_records_its_dtype(tmp_path, fp16_folders):
    """A short phase-1 run in this process: the fp16 folders trained in bf16, recorded in train_summary.json."""
    params = _params(tmp_path, fp16_folders, dtype="bfloat16")
    params["train"]["phase1"].update(epochs=1, global_batch_size=8, micro_batch_size=4, log_every=1, save_every=100)
    cfg = load_config(write_params(tmp_path, params))
    pipeline.run_download(cfg, "synthetic_shapes")
    pipeline.run_convert(cfg, "shapes_pretrain")
    pipeline.run_hdf5(cfg, "phase1")
    try:
        summary = Recipe(cfg, "phase1").train()
    finally:  # the run's accelerate state is a process-wide singleton: leave none for later tests
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert summary["model_dtype"] == "bfloat16" and summary["steps"] >= 1
    assert summary["final_loss"] == summary["final_loss"]  # not NaN
