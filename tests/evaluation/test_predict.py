"""`predict`: the same answer from the training checkpoint, its HF export and its original-LLaVA export, and
that answer is the training model's own greedy decoding."""

from __future__ import annotations

import json

import pytest
import torch

from llava_core.cli import main
from llava_core.data.images import clip_transform, load_rgb
from llava_core.data.prompts import encode_conversation
from llava_core.data.tokenizer import load_tokenizer
from llava_core.evaluation.predict import detect_format, load_for_inference, predict
from llava_core.model.hf import export_hf, import_hf
from llava_core.model.llava import load_model
from llava_core.model.original import export_llava
from tests.helpers_models import eval_config, write_checkpoint
from tests.helpers_unit import write_png

PROMPT = "What color is the shape?"
STEPS = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    cfg = eval_config(root / "ws")
    ckpt = write_checkpoint(cfg, load_tokenizer(cfg.resolve_file(cfg.model.tokenizer)), seed=5)
    image = write_png(root / "red.png", (48, 36), (210, 40, 40))
    return {"training": ckpt, "hf": export_hf(cfg).path, "llava": export_llava(cfg).path, "image": image}


def greedy_with_training_model(folder, image, prompt: str, steps: int) -> str:
    """Greedy decoding by hand with the training model's forward (no cache, no HF generation code)."""
    from transformers import AutoTokenizer

    model = load_model(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
    enc = encode_conversation(
        [{"from": "human", "value": f"<image>\n{prompt}"}], tok, "vicuna_v1", model.num_patches, 0, True
    )
    ids = list(enc.input_ids)
    pixels = clip_transform(load_rgb(image), 32)[None]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            x = torch.tensor([ids + new])
            logits, _ = model(x, torch.ones_like(x), pixels, torch.tensor([True]), enc.image_start)
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).strip()


def test_formats_are_detected_from_files(folders, tmp_path):
    assert detect_format(folders["training"]) == "training"
    assert detect_format(folders["hf"]) == "hf"
    assert detect_format(folders["llava"]) == "llava"
    assert detect_format(folders["llava"] / "text_model_llava") == "llava"
    with pytest.raises(ValueError, match="no model folder this project reads; valid: training"):
        detect_format(tmp_path)


def test_every_format_gives_the_training_models_greedy_answer(folders):
    expected = greedy_with_training_model(folders["training"], folders["image"], PROMPT, STEPS)
    answers = {
        fmt: predict(folders[fmt], folders["image"], PROMPT, max_new_tokens=STEPS)
        for fmt in ("training", "hf", "llava")
    }
    assert {fmt: r.format for fmt, r in answers.items()} == {"training": "training", "hf": "hf", "llava": "llava"}
    assert {fmt: r.answer for fmt, r in answers.items()} == dict.fromkeys(answers, expected)
    assert expected  # a non-empty answer (the perturbed random model does not stop at once)


def test_imported_hf_folder_predicts_the_same(folders, tmp_path):
    imported = import_hf(folders["hf"], tmp_path / "imported").path
    a = predict(imported, folders["image"], PROMPT, max_new_tokens=STEPS).answer
    b = predict(folders["hf"], folders["image"], PROMPT, max_new_tokens=STEPS).answer
    assert a == b


def test_prompt_style_and_suffix(folders):
    m = load_for_inference(folders["hf"])
    assert m.prompt_style == "vicuna_v1"  # recorded in export_info.json
    assert load_for_inference(folders["training"], prompt_style="llava_v1").prompt_style == "llava_v1"
    r = predict(folders["hf"], folders["image"], PROMPT, max_new_tokens=1, suffix="short_answer")
    assert r.prompt == f"{PROMPT}\nAnswer the question using a single word or phrase."
    with pytest.raises(ValueError, match="unknown suffix 'long'"):
        predict(folders["hf"], folders["image"], PROMPT, suffix="long")
    with pytest.raises(ValueError, match="unknown prompt style 'chatml'"):
        load_for_inference(folders["hf"], prompt_style="chatml")


def test_predict_command(folders, capsys, tmp_path):
    args = ["predict", "--model", str(folders["llava"]), "--image", str(folders["image"]), "--prompt", PROMPT]
    # no params file needed
    assert main(["--params", str(tmp_path / "absent.yaml"), *args, "--max-new-tokens", str(STEPS)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "llava" and out["prompt"] == PROMPT
    assert out["answer"] == predict(folders["hf"], folders["image"], PROMPT, max_new_tokens=STEPS).answer
