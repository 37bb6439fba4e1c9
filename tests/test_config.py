"""load_config: presets, overrides and the errors that name the valid choices."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from llava_core.config import ConfigError, PipelineConfig
from llava_core.params import TOP_KEYS, config_from_dict, load_config
from llava_core.presets import PRESETS
from tests.helpers_unit import CPU_ACCELERATE, TINY_TOKENIZER, base_params, write_params


def load(tmp_path: Path, params: dict) -> PipelineConfig:
    return load_config(write_params(tmp_path, params))


@pytest.fixture
def params(tmp_path):
    return base_params(tmp_path / "ws")


def test_project_like_params_load(tmp_path, params):
    cfg = load(tmp_path, params)
    assert cfg.preset == "tiny"
    assert cfg.base_dir == tmp_path.resolve()
    assert cfg.sources["synthetic_shapes"].options["num_pretrain"] == 20
    assert cfg.datasets_for("phase1") == ["shapes_pretrain"]
    assert cfg.datasets_for("phase2") == ["shapes_instruct"]
    assert cfg.raw_dir("synthetic_shapes") == tmp_path / "ws" / "data/raw/synthetic_shapes"
    assert cfg.jsonl_path("shapes_instruct") == tmp_path / "ws" / "data/jsonl/shapes_instruct.jsonl"
    assert cfg.hdf5_dir("phase2") == tmp_path / "ws" / "data/hdf5/phase2"
    assert cfg.image_root == tmp_path / "ws" / "data/raw"
    assert cfg.train["phase1"].accelerate_config == CPU_ACCELERATE
    assert cfg.eval.metrics == params["eval"]["metrics"]
    assert cfg.eval.prompt_style == "vicuna_v1" and cfg.eval.default_metric == "exact_match"


def test_relative_workspace_root_resolves_against_params_folder(tmp_path, params):
    params["workspace"]["root"] = "sub"
    cfg = load(tmp_path, params)
    assert cfg.path("raw") == tmp_path.resolve() / "sub" / "data/raw"


def test_unknown_top_level_key(tmp_path, params):
    params["trian"] = {}
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, params)
    assert ei.value.errors == [("params", f"unknown key 'trian'; valid: {', '.join(TOP_KEYS)}")]
    assert str(ei.value).endswith(f"params.yaml: params: unknown key 'trian'; valid: {', '.join(TOP_KEYS)}")


def test_unknown_nested_key_names_valid_ones(tmp_path, params):
    params["train"]["phase2"]["lr"] = 0.1
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, params)
    [(where, msg)] = ei.value.errors
    assert where == "train.phase2" and msg.startswith("unknown key 'lr'; valid: epochs, global_batch_size, ")
    assert "learning_rate" in msg and "global_batch_size" in msg


def test_unknown_preset(tmp_path, params):
    params["preset"] = "llava-v2-70b"
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, params)
    msg = str(ei.value)
    assert "'llava-v2-70b'" in msg
    for name in ("tiny", "llava-v1.5-7b", "llava-v1.5-13b"):
        assert name in msg


def test_unknown_converter(tmp_path, params):
    params["datasets"]["shapes_instruct"]["converter"] = "csv"
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, params)
    msg = str(ei.value)
    assert "datasets.shapes_instruct.converter" in msg
    assert "'csv'" in msg and "llava_json" in msg


def test_unknown_prompt_style(tmp_path, params):
    params["hdf5"]["phase2"]["prompt_style"] = "chatml"
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, params)
    msg = str(ei.value)
    assert "hdf5.phase2.prompt_style" in msg
    assert "'chatml'" in msg
    for style in ("plain", "vicuna_v1", "llava_v1"):
        assert style in msg


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_workers", 0, "hdf5.phase2.num_workers: Input should be greater than 0 (got 0)"),
        ("shard_size", -1, "hdf5.phase2.shard_size: Input should be greater than 0 (got -1)"),
        (
            "max_discarded_fraction",
            1.5,
            "hdf5.phase2.max_discarded_fraction: Input should be less than or equal to 1 (got 1.5)",
        ),
    ],
)
def test_bad_hdf5_numbers(tmp_path, params, key, value, message):
    params["hdf5"]["phase2"][key] = value
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, params)
    assert str(ei.value) == f"{tmp_path.resolve() / 'params.yaml'}: {message}"


def test_global_batch_not_multiple_of_micro(tmp_path, params):
    params["train"]["phase1"].update({"global_batch_size": 48, "micro_batch_size": 32})
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, params)
    assert ei.value.errors == [("train.phase1", "global_batch_size 48 is not a multiple of micro_batch_size 32")]


def test_unknown_metric(tmp_path, params):
    params["eval"]["metrics"]["count"] = "bleu"
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, params)
    msg = str(ei.value)
    assert "eval.metrics.count" in msg and "'bleu'" in msg
    for m in ("exact_match", "pope", "vqa_accuracy"):
        assert m in msg


def test_unknown_default_metric(tmp_path, params):
    params["eval"]["default_metric"] = "bleu"
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, params)
    [(where, msg)] = ei.value.errors
    assert where == "eval.default_metric" and "(got 'bleu')" in msg
    for m in ("exact_match", "pope", "vqa_accuracy"):
        assert repr(m) in msg


def test_source_name_with_dash(tmp_path, params):
    params["sources"]["synthetic-shapes"] = params["sources"].pop("synthetic_shapes")
    for ds in params["datasets"].values():
        ds["source"] = "synthetic-shapes"
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, params)
    [(where, msg)] = ei.value.errors
    assert where == "sources" and msg.startswith("source name 'synthetic-shapes':")
    assert "letters, digits and underscores" in msg


def test_dataset_name_with_dash(tmp_path, params):
    params["datasets"]["shapes-instruct"] = params["datasets"].pop("shapes_instruct")
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, params)
    [(where, msg)] = ei.value.errors
    assert where == "datasets" and msg.startswith("dataset name 'shapes-instruct':")


def test_unknown_source_kind_and_dataset_source_and_phase(tmp_path, params):
    p = copy.deepcopy(params)
    p["sources"]["synthetic_shapes"]["kind"] = "ftp"
    with pytest.raises(
        ConfigError,
        match=r"sources\.synthetic_shapes\.kind: Input should be 'generated', 'local', 'hf', 's3' or 'http' \(got 'ftp'\)",
    ):
        load(tmp_path, p)
    p = copy.deepcopy(params)
    p["datasets"]["shapes_instruct"]["source"] = "coco"
    with pytest.raises(
        ConfigError, match=r"datasets\.shapes_instruct\.source: unknown source 'coco'; valid: synthetic_shapes$"
    ):
        load(tmp_path, p)
    p = copy.deepcopy(params)
    p["datasets"]["shapes_instruct"]["phase"] = "phase3"
    with pytest.raises(
        ConfigError, match=r"datasets\.shapes_instruct\.phase: unknown phase 'phase3'; valid: phase1, phase2$"
    ):
        load(tmp_path, p)


def test_missing_eval_section(tmp_path, params):
    del params["eval"]
    with pytest.raises(ConfigError, match=r"params\.yaml: eval: missing \(required\)$"):
        load(tmp_path, params)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")


def test_bad_mixed_precision(tmp_path, params):
    params["train"]["phase2"]["mixed_precision"] = "fp8"
    with pytest.raises(
        ConfigError, match=r"train\.phase2\.mixed_precision: Input should be 'no', 'bf16' or 'fp16' \(got 'fp8'\)"
    ):
        load(tmp_path, params)


def test_presets_registered():
    assert set(PRESETS) == {"tiny", "llava-v1.5-7b", "llava-v1.5-13b"}


def test_tiny_preset(tmp_path, params):
    cfg = load(tmp_path, params)
    vision = cfg.model.vision_config
    num_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    assert cfg.model.image_size == vision["image_size"] and cfg.model.vision_pretrained is None
    assert cfg.model.tokenizer == "resource:tiny_tokenizer"  # portable: no absolute path in params or outputs
    assert cfg.resolve_file(cfg.model.tokenizer) == TINY_TOKENIZER
    assert cfg.hdf5["phase1"].prompt_style == "plain" and cfg.hdf5["phase2"].prompt_style == "vicuna_v1"
    # room for BOS, the image slots and some text in each phase
    assert all(cfg.hdf5[p].max_sequence_length > num_patches + 16 for p in ("phase1", "phase2"))
    assert cfg.train["phase1"].freeze == ["^image_model", "^text_model"]
    assert cfg.train["phase2"].freeze == ["^image_model"]


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_llava15_presets_follow_the_recipe(tmp_path, params, size):
    params["preset"] = f"llava-v1.5-{size}"
    # the project's params only sets the accelerate config under train: everything else comes from the preset
    for phase in ("phase1", "phase2"):
        params["train"][phase] = {"accelerate_config": CPU_ACCELERATE}
    cfg = load(tmp_path, params)
    assert cfg.preset == f"llava-v1.5-{size}"
    m = cfg.model
    assert m.vision_pretrained == "openai/clip-vit-large-patch14-336"
    assert m.text_pretrained == f"lmsys/vicuna-{size}-v1.5"
    assert m.tokenizer == f"lmsys/vicuna-{size}-v1.5"
    assert m.vision_config is None and m.text_config is None
    assert m.image_size == 336 and m.projector == "mlp2x_gelu" and m.vision_feature_layer == -2
    p1, p2 = cfg.train["phase1"], cfg.train["phase2"]
    assert (p1.learning_rate, p1.global_batch_size, p1.epochs) == (1e-3, 256, 1)
    assert (p2.learning_rate, p2.global_batch_size, p2.epochs) == (2e-5, 128, 1)
    assert p1.freeze == ["^image_model", "^text_model"]
    assert p2.freeze == ["^image_model"]
    for t in (p1, p2):
        assert t.warmup_ratio == 0.03 and t.weight_decay == 0.0 and t.max_grad_norm == 1.0
        assert t.mixed_precision == "bf16"
        assert t.global_batch_size % t.micro_batch_size == 0
        assert t.accelerate_config == CPU_ACCELERATE  # the params value overrides the preset's
    assert cfg.hdf5["phase1"].prompt_style == "plain"
    assert cfg.hdf5["phase2"].prompt_style == "vicuna_v1"


def test_params_override_merges_over_preset(tmp_path, params):
    params["train"]["phase2"]["epochs"] = 3
    params["hdf5"]["phase2"]["max_sequence_length"] = 200
    params["model"] = {"text_config": {"num_hidden_layers": 2}}
    cfg = load(tmp_path, params)
    assert cfg.train["phase2"].epochs == 3
    # the rest of the phase keeps the preset's values
    preset = PRESETS["tiny"]()["train"]["phase2"]
    assert cfg.train["phase2"].learning_rate == preset["learning_rate"]
    assert cfg.train["phase2"].global_batch_size == preset["global_batch_size"]
    assert cfg.train["phase2"].freeze == ["^image_model"]
    assert cfg.train["phase1"].epochs == 1
    assert cfg.hdf5["phase2"].max_sequence_length == 200
    assert cfg.hdf5["phase2"].prompt_style == "vicuna_v1"
    # nested dicts merge key by key
    assert cfg.model.text_config["num_hidden_layers"] == 2
    assert cfg.model.text_config["hidden_size"] == 128


def test_7b_preset_override(tmp_path, params):
    params["preset"] = "llava-v1.5-7b"
    params["train"]["phase2"] = {"epochs": 2, "accelerate_config": CPU_ACCELERATE}
    cfg = load(tmp_path, params)
    assert cfg.train["phase2"].epochs == 2
    assert cfg.train["phase2"].learning_rate == 2e-5
    assert cfg.train["phase2"].global_batch_size == 128


def test_load_config_overrides_argument(tmp_path, params):
    path = write_params(tmp_path, params)
    cfg = load_config(path, overrides={"train": {"phase1": {"learning_rate": 5e-4}}, "seed": 7})
    assert cfg.train["phase1"].learning_rate == 5e-4
    assert cfg.train["phase1"].global_batch_size == 32
    assert cfg.seed == 7


def test_stage_view_and_to_dict(tmp_path, params):
    cfg = load(tmp_path, params)
    view = cfg.stage_view("hdf5")
    assert set(view) == {"preset", "seed", "hdf5"}
    assert view["hdf5"]["phase2"]["max_sequence_length"] == cfg.hdf5["phase2"].max_sequence_length
    # every key as a params file holds it (not the folder it was read from), and it reads back the same
    assert "base_dir" not in cfg.to_dict() and set(cfg.to_dict()) == set(TOP_KEYS)
    again = config_from_dict(cfg.to_dict(), cfg.base_dir)
    assert again == cfg and again.base_dir == tmp_path.resolve()
