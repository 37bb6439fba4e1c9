"""The export layouts as the other side reads them: `models/hf` like llava-hf's folders (weight names, config
fields, processor and tokenizer files, llava-hf's chat template, shards with an index past `export.max_shard_size`);
tokenizer files older transformers and tokenizers read; the Cerebras layout beside `text_model_llava/`, read by an
independent re-implementation of Cerebras' HF-to-CS LLaVA converter; and folders exported before these layouts
still importing bit-identically."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from llava_core.config import ConfigError
from llava_core.data.tokenizer import load_tokenizer
from llava_core.model.hf import (
    HF_FILE_KEY_MAP,
    LLAVA_HF_CHAT_TEMPLATE,
    export_hf,
    from_hf_state_dict,
    hf_from_training,
    import_hf,
    llava_hf_chat_template,
    to_hf_state_dict,
)
from llava_core.model.llava import load_model
from llava_core.model.original import export_llava, import_llava, load_llava_original
from llava_core.model.weights import (
    classic_tokenizer_class,
    load_weights,
    merge_text,
    remap,
    reverse_map,
    sentencepiece_normalizer,
    shard_plan,
    write_classic_tokenizer,
)
from llava_core.params import load_config
from tests.helpers_models import write_checkpoint
from tests.helpers_tokenizers import KINDS, build_tokenizer_folder
from tests.helpers_unit import TINY_TOKENIZER, base_params, write_params

IMAGE = {"type": "image"}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


# llava-hf's template, by its documented output: `ROLE: `, the message's images first, each text + " "
CHAT_CASES = [
    ([{"role": "user", "content": [IMAGE, text("What is shown?")]}], True, "USER: <image>\nWhat is shown? ASSISTANT:"),
    ([{"role": "user", "content": [IMAGE, text("What is shown?")]}], False, "USER: <image>\nWhat is shown? "),
    ([{"role": "user", "content": [text("Where?"), IMAGE]}], True, "USER: <image>\nWhere? ASSISTANT:"),
    (
        [{"role": "user", "content": [IMAGE, IMAGE, text("Compare.")]}],
        True,
        "USER: <image>\n<image>\nCompare. ASSISTANT:",
    ),
    (
        [
            {"role": "user", "content": [IMAGE, text("Q1")]},
            {"role": "assistant", "content": [text("A1")]},
            {"role": "user", "content": [text("Q2")]},
        ],
        True,
        "USER: <image>\nQ1 ASSISTANT: A1 USER: Q2 ASSISTANT:",
    ),
    (
        [{"role": "system", "content": [text("Be brief.")]}, {"role": "user", "content": [IMAGE, text("Q")]}],
        True,
        "Be brief. USER: <image>\nQ ASSISTANT:",
    ),
    ([{"role": "user", "content": "plain text"}], True, "USER: plain text ASSISTANT:"),  # ours: a string is a text
]


def workspace(tmp_path: Path, **export) -> tuple:
    """A tiny finished phase-2 checkpoint (perturbed random weights) in a fresh workspace."""
    params = base_params(tmp_path)
    if export:
        params["export"] = export
    cfg = load_config(write_params(tmp_path, params))
    return cfg, write_checkpoint(cfg, load_tokenizer(cfg.resolve_file(cfg.model.tokenizer)))


@pytest.fixture
def hf_export(tmp_path):
    cfg, ckpt = workspace(tmp_path)
    return cfg, ckpt, export_hf(cfg).path


# --- the chat template -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("marks", [True, False])
@pytest.mark.parametrize("conv,gen,want", CHAT_CASES)
def test_chat_template_renders_what_llava_hf_renders(conv, gen, want, marks):
    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    template = llava_hf_chat_template(assistant_marks=marks)
    got = tok.apply_chat_template(conv, chat_template=template, add_generation_prompt=gen, tokenize=False)
    assert got == want
    assert "<s>" not in got and "</s>" not in got


def test_exported_template_one_bos_in_both_uses_and_assistant_masks(hf_export):
    from PIL import Image

    _, ckpt, out = hf_export
    processor = AutoProcessor.from_pretrained(out)
    tok = processor.tokenizer
    assert processor.chat_template == LLAVA_HF_CHAT_TEMPLATE
    assert tok.chat_template == llava_hf_chat_template(assistant_marks=False)
    conv = CHAT_CASES[0][0]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    image = Image.new("RGB", (32, 32), (20, 120, 220))
    two_step = processor(text=prompt, images=image, return_tensors="pt")["input_ids"][0].tolist()
    assert two_step[0] == tok.bos_token_id and two_step.count(tok.bos_token_id) == 1
    img_path = out.parent / "blue.png"
    image.save(img_path)
    conv_with_image = [{"role": "user", "content": [{"type": "image", "path": str(img_path)}, text("What is shown?")]}]
    one_step = processor.apply_chat_template(
        conv_with_image, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert list(one_step["input_ids"][0]) == two_step
    # the answers are marked for assistant masks, as in llava-hf's template
    qa = [{"role": "user", "content": [text("What color?")]}, {"role": "assistant", "content": [text("red")]}]
    marked = processor.apply_chat_template(qa, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(marked["input_ids"][0]), list(marked["assistant_masks"][0])
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]).strip() == "red"
    # the training tokenizer tokenises the prompt the same way
    train_tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    assert tok(prompt).input_ids == train_tok(prompt).input_ids


# --- the Hugging Face export -----------------------------------------------------------------------------------


def test_hf_export_is_laid_out_like_llava_hf(hf_export):
    cfg, ckpt, out = hf_export
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "processor_config.json",
        "chat_template.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "export_info.json",
    }
    model = load_model(ckpt)
    state = model.state_dict()
    weights = load_weights(out)
    prefixes = ("vision_tower.vision_model.", "multi_modal_projector.linear_", "language_model.model.")
    assert all(k.startswith(prefixes) or k == "language_model.lm_head.weight" for k in weights)
    assert sum(k.startswith("vision_tower.vision_model.") for k in weights) == len(model.image_model.state_dict())
    assert {k for k in weights if k.startswith("multi_modal_projector.")} == {
        f"multi_modal_projector.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")
    }
    back = from_hf_state_dict(remap(weights, reverse_map(HF_FILE_KEY_MAP)))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["model_type"] == "llava"
    assert {k: config[k] for k in ("image_token_index", "image_seq_length", "vision_feature_layer")} == {
        "image_token_index": 3,
        "image_seq_length": 64,
        "vision_feature_layer": -2,
    }
    assert config["vision_feature_select_strategy"] == "default" and config["projector_hidden_act"] == "gelu"
    assert (
        config["text_config"]["rope_theta"] == 10000.0 and config["vocab_size"] == config["text_config"]["vocab_size"]
    )
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert json.loads((out / "processor_config.json").read_text()) == {
        "processor_class": "LlavaProcessor",
        "image_token": "<image>",
        "num_additional_image_tokens": 1,
        "patch_size": 4,
        "vision_feature_select_strategy": "default",
    }
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "LlavaImageProcessor" and pre["processor_class"] == "LlavaProcessor"
    assert pre["do_pad"] and pre["size"] == {"shortest_edge": 32} and pre["crop_size"] == {"height": 32, "width": 32}
    assert json.loads((out / "chat_template.json").read_text()) == {"chat_template": LLAVA_HF_CHAT_TEMPLATE}
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "LlamaTokenizerFast" and "backend" not in tc
    assert (tc["add_bos_token"], tc["add_eos_token"], tc["legacy"]) == (True, False, True)
    assert tc["extra_special_tokens"] == {"image_token": "<image>"}
    tj = json.loads((out / "tokenizer.json").read_text())
    merges = tj["model"]["merges"]
    assert merges and all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)
    tok, train_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    for t in ("What color is the circle?", " two  spaces", "USER: <image>\nIs it red? ASSISTANT: yes</s>"):
        assert tok(t).input_ids == train_tok(t).input_ids


def test_shard_plan_closes_a_shard_before_the_limit():
    state = {
        "a": torch.zeros(100),
        "b": torch.zeros(100),
        "c": torch.zeros(75),
        "big": torch.zeros(500),
        "d": torch.zeros(1),
    }
    assert shard_plan(state, 1000) == [["a", "b"], ["c"], ["big"], ["d"]]  # 400 + 400 bytes, then 300, 2000 alone
    assert shard_plan(state, 10**6) == [["a", "b", "c", "big", "d"]]
    assert shard_plan({}, 10) == []


def test_hf_export_shards_past_max_shard_size_and_loads_and_imports(tmp_path):
    cfg, ckpt = workspace(tmp_path, max_shard_size="1MB")
    out = export_hf(cfg).path
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert not (out / "model.safetensors").exists() and len(shards) >= 4
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(set(index["weight_map"].values())) == shards
    for name in shards:
        tensors = [k for k, v in index["weight_map"].items() if v == name]
        assert len(tensors) == 1 or (out / name).stat().st_size <= 1_000_000 + 10_000  # + the safetensors header
    weights = load_weights(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = to_hf_state_dict(load_model(ckpt).state_dict())
    assert all(torch.equal(hf.state_dict()[k], v) for k, v in expected.items())
    back = import_hf(out, tmp_path / "imported")
    state, again = load_model(ckpt).state_dict(), load_model(back.path).state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_export_max_shard_size_is_checked(tmp_path):
    params = base_params(tmp_path)
    params["export"] = {"max_shard_size": "5 gigs"}
    with pytest.raises(ConfigError, match=r"export\.max_shard_size: .*'5 gigs' is not a size"):
        load_config(write_params(tmp_path, params))
    params["export"] = {"max_shard_size": "2MiB"}
    assert load_config(write_params(tmp_path, params)).export.max_shard_bytes == 2 * 2**20


# --- tokenizer files older releases read -----------------------------------------------------------------------


def test_classic_tokenizer_class_and_merges():
    bpe = {"type": "BPE", "byte_fallback": True}
    assert classic_tokenizer_class("TokenizersBackend", bpe) == "LlamaTokenizerFast"
    assert classic_tokenizer_class("TokenizersBackend", {"type": "BPE"}) == "PreTrainedTokenizerFast"
    assert classic_tokenizer_class("LlamaTokenizer", bpe) == "LlamaTokenizerFast"
    assert classic_tokenizer_class("GPT2TokenizerFast", {"type": "BPE"}) == "GPT2TokenizerFast"
    assert merge_text(["▁t", "he"]) == "▁t he" and merge_text("a b") == "a b"
    with pytest.raises(ValueError, match="holds a space"):
        merge_text(["a ", "b"])


def random_texts(n: int = 300) -> list[str]:
    rng = random.Random(0)
    alphabet = list("abcdefgh ") + [" ", "  ", "\n", "▁", "<s>", "</s>", "What", " color", "?", "é", "☃"]
    return [
        " " * rng.randint(0, 2) + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(n)
    ]


def test_transformers_5_llama_pipeline_rewritten_tokenises_the_same(tmp_path):
    tok = AutoTokenizer.from_pretrained(build_tokenizer_folder(tmp_path / "llama", "llama"))
    tj = json.loads(tok.backend_tokenizer.to_str())
    assert tj["pre_tokenizer"]["type"] == "Metaspace" and tj["pre_tokenizer"]["split"] is False  # 5.x's form
    new = sentencepiece_normalizer(tj)
    assert new["pre_tokenizer"] is None and new["normalizer"]["type"] == "Sequence"
    rewritten = Tokenizer.from_str(json.dumps(new))
    for t in random_texts():
        assert rewritten.encode(t).ids == tok.backend_tokenizer.encode(t).ids, repr(t)
    first = {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}}
    assert sentencepiece_normalizer(first) == first  # non-legacy: no equivalent older form, kept


@pytest.mark.parametrize("kind", ["tiny", *KINDS])
def test_written_tokenizer_loads_as_the_same_tokenizer(kind, tmp_path):
    src = Path(TINY_TOKENIZER) if kind == "tiny" else build_tokenizer_folder(tmp_path / "src", kind)
    tok = AutoTokenizer.from_pretrained(src)
    write_classic_tokenizer(tok, tmp_path / "out", source=src)
    # the files as written (4.x's fast classes and 5.x beside a llava config.json load them so; 5.x alone would
    # rebuild a class named LlamaTokenizerFast with its own pipeline)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path / "out")
    for t in random_texts(100) + ["USER: <image>\nIs it red? ASSISTANT: yes</s>", "[INST] hi [/INST]"]:
        assert again(t).input_ids == tok(t).input_ids, repr(t)
    tc = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "LlamaTokenizerFast" and tc["legacy"] == (kind != "mistral")
    assert tc["add_bos_token"] is True and tc["add_eos_token"] is False


# --- the original LLaVA layout and Cerebras' reader ----------------------------------------------------------


def cerebras_checkpoint_file(directory: Path) -> Path:
    """Cerebras' converter (BaseCheckpointConverter_UnpackedHF_PackedCS.load): the first `*.index.json` of the
    component folder, else its `pytorch_model.bin`; anything else is refused."""
    for name in os.listdir(directory):
        if name.endswith(".index.json"):
            return directory / name
    if "pytorch_model.bin" in os.listdir(directory):
        return directory / "pytorch_model.bin"
    raise AssertionError(f"{directory}: no .index.json and no pytorch_model.bin")


def cerebras_weights(file: Path) -> dict[str, torch.Tensor]:
    """StreamingShardedHFReader for an index (every shard it names must exist; .safetensors or torch files)."""
    from safetensors.torch import load_file

    if not file.name.endswith(".index.json"):
        return torch.load(file, map_location="cpu", weights_only=True)
    weight_map = json.loads(file.read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = file.parent / shard
        assert path.exists(), f"missing checkpoint shard: {path}"
        data = load_file(path) if shard.endswith(".safetensors") else torch.load(path, weights_only=True)
        out.update({k: data[k] for k, v in weight_map.items() if v == shard})
    return out


# The keys the converter's rules match (llava.py with clip_vit.py and llama.py): mapped, or dropped on purpose.
CS_IMAGE = re.compile(
    r"vision_model\.(?:embeddings\.(?:class_embedding|position_embedding\.weight|patch_embedding\.(?:weight|bias))"
    r"|pre_layrnorm\.(?:weight|bias)|post_layernorm\.(?:weight|bias)"
    r"|encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]|layer_norm[12])\.(?:weight|bias))"
)
CS_IMAGE_DROPPED = re.compile(
    r"vision_model\.embeddings\.position_ids|text_model\..*|logit_scale.*|(?:visual|text)_projection\.(?:weight|bias)"
)
CS_TEXT = re.compile(
    r"lm_head\.(?:weight|bias)|model\.(?:embed_tokens\.(?:weight|bias)|norm\.(?:weight|bias)"
    r"|layers\.\d+\.(?:self_attn\.(?:[qkvo]_proj|[qk]_norm)|input_layernorm|post_attention_layernorm"
    r"|mlp\.(?:up|gate|down)_proj)\.(?:weight|bias))"
)
CS_TEXT_DROPPED = re.compile(r"model\.vision_tower\..*|model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
CS_PROJECTOR = re.compile(r"model\.mm_projector\.(\d+)\.(weight|bias)")


def cerebras_read(root: Path) -> dict:
    """What the HF-to-CS LLaVA conversion reads from `root`: per component its config.json and weights, every key
    matched by a rule (no --drop-unmatched-keys), the projector's Linear layers (HF index i -> CS ffn.{i // 2})."""
    got: dict = {}
    for name in ("image_model", "text_model"):
        folder = root / name
        assert (folder / "config.json").exists()
        got[name] = {"config": json.loads((folder / "config.json").read_text()), "weights": {}}
        for key, value in cerebras_weights(cerebras_checkpoint_file(folder)).items():
            if name == "image_model" and CS_IMAGE.fullmatch(key) or name == "text_model" and CS_TEXT.fullmatch(key):
                got[name]["weights"][key] = value
            elif m := CS_PROJECTOR.fullmatch(key) if name == "text_model" else None:
                got.setdefault("projector", {})[f"ffn.{int(m.group(1)) // 2}.linear_layer.{m.group(2)}"] = value
            else:
                dropped = CS_IMAGE_DROPPED if name == "image_model" else CS_TEXT_DROPPED
                assert dropped.fullmatch(key), f"{name}: key {key} matches no rule of the converter"
    image_config = got["image_model"]["config"]
    image_config = image_config.get("vision_config", image_config)
    text_config = got["text_model"]["config"]
    layers = int(re.fullmatch(r"mlp(\d+)x_gelu", text_config["mm_projector_type"]).group(1))
    assert text_config["mm_hidden_size"] == image_config["hidden_size"]
    assert text_config.get("mm_use_im_start_end", False) is False
    assert text_config.get("mm_use_im_patch_token", False) is False
    assert text_config.get("mm_vision_select_feature", "patch") == "patch"
    assert sorted(got["projector"]) == sorted(
        f"ffn.{i}.linear_layer.{w}" for i in range(layers) for w in ("weight", "bias")
    )
    return got


def test_cerebras_converter_reads_image_model_and_text_model(tmp_path):
    cfg, ckpt = workspace(tmp_path, max_shard_size="1MB")
    result = export_llava(cfg)
    root = result.path
    assert result.cerebras_text_model == root / "text_model"
    got = cerebras_read(root)
    state = load_model(ckpt).state_dict()
    assert got["image_model"]["weights"].keys() == {
        f"vision_model.{k[len('image_model.') :]}" for k in state if k.startswith("image_model.")
    }
    for key, value in got["image_model"]["weights"].items():
        assert torch.equal(value, state["image_model." + key[len("vision_model.") :]])
    assert len(got["text_model"]["weights"]) == sum(k.startswith("text_model.") for k in state)
    assert torch.equal(got["projector"]["ffn.1.linear_layer.weight"], state["projector.2.weight"])
    assert torch.equal(got["text_model"]["weights"]["lm_head.weight"], state["text_model.lm_head.weight"])
    # one index per folder (the converter takes the first it lists), sharded at 1 MB, and no lone model.safetensors
    for name in ("image_model", "text_model", "text_model_llava"):
        assert [p.name for p in (root / name).glob("*.index.json")] == ["model.safetensors.index.json"]
        assert not (root / name / "model.safetensors").exists()
    assert len(list((root / "text_model").glob("model-*.safetensors"))) >= 3
    # text_model/ is text_model_llava/ under Cerebras' name: the same files, linked where the disk allows
    llava_files = sorted(p.name for p in (root / "text_model_llava").iterdir())
    assert sorted(p.name for p in (root / "text_model").iterdir()) == llava_files
    for name in llava_files:
        assert (root / "text_model" / name).read_bytes() == (root / "text_model_llava" / name).read_bytes()
    # the training checkpoint's single model.safetensors is what the converter refuses
    with pytest.raises(AssertionError, match="no .index.json and no pytorch_model.bin"):
        cerebras_checkpoint_file(ckpt)
    # and the Cerebras folder reads back as a LLaVA checkpoint too
    model, _ = load_llava_original(root / "text_model")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


# --- folders exported before these layouts --------------------------------------------------------------------


def test_hf_folder_of_the_earlier_layout_imports_bit_identically(tmp_path):
    """The earlier export: transformers 5's own save_pretrained (`vision_tower.*` without `vision_model.`)."""
    from safetensors.torch import load_file

    cfg, ckpt = workspace(tmp_path)
    model = load_model(ckpt).eval()
    conv = hf_from_training(model, AutoTokenizer.from_pretrained(ckpt / "tokenizer"))
    old = tmp_path / "old_hf"
    conv.model.save_pretrained(old)
    conv.tokenizer.save_pretrained(old)
    assert any(k.startswith("vision_tower.embeddings.") for k in load_file(old / "model.safetensors"))
    back = import_hf(old, tmp_path / "imported")
    state = load_file(back.path / "model.safetensors")
    assert all(torch.equal(state[k], v) for k, v in load_file(ckpt / "model.safetensors").items())


def test_llava_folder_of_the_earlier_layout_imports_bit_identically(tmp_path):
    """The earlier export: one unsharded model.safetensors per folder, no text_model/."""
    import shutil

    from safetensors.torch import load_file, save_file

    cfg, ckpt = workspace(tmp_path)
    root = export_llava(cfg).path
    shutil.rmtree(root / "text_model")
    for name in ("image_model", "text_model_llava"):
        weights = load_weights(root / name)
        for f in (root / name).glob("model*"):
            f.unlink()
        save_file(weights, str(root / name / "model.safetensors"))
    back = import_llava(root, tmp_path / "imported")
    state = load_file(back.path / "model.safetensors")
    assert all(torch.equal(state[k], v) for k, v in load_file(ckpt / "model.safetensors").items())
