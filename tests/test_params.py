"""Bad params values: each reported with its key path (and the valid choices where there are some), every
problem of a file at once, before any stage runs; values YAML reads loosely are coerced where unambiguous."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from llava_core.cli import main
from llava_core.config import ConfigError
from llava_core.params import TOP_KEYS, load_config
from tests.helpers_unit import PROJECT, base_params, write_params

DDP = str(PROJECT / "configs" / "accelerate" / "cpu_ddp.yaml")  # 2 processes
TRAIN_KEYS = "epochs, global_batch_size, micro_batch_size, learning_rate, warmup_ratio, weight_decay"


def at(params: dict, path: str, value) -> None:
    """Set `a.b.c` in the nested params (creating mappings on the way; a mapping merges into one there)."""
    *parents, last = path.split(".")
    for key in parents:
        params = params.setdefault(key, {})
    if isinstance(value, dict) and isinstance(params.get(last), dict):
        params[last].update(value)
    else:
        params[last] = value


# (what is wrong, key path set, value, key path reported, the message: a regex matched from its start to its end)
BAD = [
    ("wrong type: text for a number", "train.phase2.epochs", "many",
     "train.phase2.epochs", r"Input should be a valid number, unable to parse string as a number \(got 'many'\)"),
    ("wrong type: a list for an integer", "hdf5.phase1.shard_size", [1, 2],
     "hdf5.phase1.shard_size", r"Input should be a valid integer \(got \[1, 2\]\)"),
    ("wrong type: not a boolean", "train.phase2.gradient_checkpointing", "maybe",
     "train.phase2.gradient_checkpointing", r"Input should be a valid boolean, unable to interpret input \(got 'maybe'\)"),
    ("wrong type: not a list", "train.phase2.trackers", "tensorboard",
     "train.phase2.trackers", r"Input should be a valid list \(got 'tensorboard'\)"),
    ("an unknown tracker", "train.phase1.trackers", ["dvclive", "comet"],
     "train.phase1.trackers.1", r"Input should be 'dvclive', 'tensorboard', 'mlflow' or 'wandb' \(got 'comet'\)"),
    ("wrong type: a section that is not a mapping", "eval", "x",
     "eval", r"Input should be a valid dictionary or instance of EvalConfig \(got 'x'\)"),
    ("wrong type: a preset section that is not a mapping", "train", "x", "train", r"expected a mapping, got str"),
    ("a non-numeric learning rate", "train.phase2.learning_rate", "fast",
     "train.phase2.learning_rate", r"Input should be a valid number, unable to parse string as a number \(got 'fast'\)"),
    ("zero micro batch", "train.phase2.micro_batch_size", 0,
     "train.phase2.micro_batch_size", r"Input should be greater than 0 \(got 0\)"),
    ("zero learning rate", "train.phase1.learning_rate", 0,
     "train.phase1.learning_rate", r"Input should be greater than 0 \(got 0\)"),
    ("zero writer processes", "hdf5.phase2.num_workers", 0,
     "hdf5.phase2.num_workers", r"Input should be greater than 0 \(got 0\)"),
    ("negative weight decay", "train.phase2.weight_decay", -0.1,
     "train.phase2.weight_decay", r"Input should be greater than or equal to 0 \(got -0\.1\)"),
    ("negative batch size", "eval.batch_size", -1, "eval.batch_size", r"Input should be greater than 0 \(got -1\)"),
    ("negative seed", "seed", -1, "seed", r"Input should be greater than or equal to 0 \(got -1\)"),
    ("a fraction above 1", "hdf5.phase2.max_discarded_fraction", 1.5,
     "hdf5.phase2.max_discarded_fraction", r"Input should be less than or equal to 1 \(got 1\.5\)"),
    ("unknown key at the top", "trian", {}, "params", f"unknown key 'trian'; valid: {', '.join(TOP_KEYS)}"),
    ("unknown key in a section", "workspace.rooot", "x",
     "workspace", r"unknown key 'rooot'; valid: root, raw, jsonl, hdf5, checkpoints, models, reports"),
    ("unknown key in a phase", "train.phase2.lr", 0.1,
     "train.phase2", rf"unknown key 'lr'; valid: {TRAIN_KEYS}, .*\blora\b.*"),
    ("unknown key in lora", "train.phase2.lora.rank", 4,
     "train.phase2.lora", r"unknown key 'rank'; valid: r, alpha, dropout, target_modules"),
    ("unknown key in the judge", "eval.judge", {"base_url": "http://127.0.0.1:1/v1", "model": "m", "temp": 1},
     "eval.judge", r"unknown key 'temp'; valid: base_url, model, api_key_env, categories, temperature, .*"),
    ("unknown phase", "train.phase3", {"epochs": 1}, "train", r"unknown phase\(s\) \['phase3'\]; valid: phase1, phase2"),
    ("unknown source option", "sources.synthetic_shapes.options.colour", 1, "sources.synthetic_shapes.options",
     r"unknown key\(s\) \['colour'\] for generator 'synthetic_shapes'; valid: seed, image_size, num_pretrain, .*"),
    ("global batch not a multiple of the micro batch", "train.phase1",
     {"global_batch_size": 48, "micro_batch_size": 32},
     "train.phase1", r"global_batch_size 48 is not a multiple of micro_batch_size 32"),
    ("global batch not divisible by micro batch x processes", "train.phase2",
     {"global_batch_size": 24, "micro_batch_size": 8, "accelerate_config": DDP},
     "train.phase2", rf"global_batch_size 24 is not divisible by micro_batch_size 8 x 2 processes \({re.escape(DDP)}\)"),
    ("unknown dataset source", "datasets.shapes_instruct.source", "coco",
     "datasets.shapes_instruct.source", r"unknown source 'coco'; valid: synthetic_shapes"),
    ("unknown dataset phase", "datasets.shapes_pretrain.phase", "phase3",
     "datasets.shapes_pretrain.phase", r"unknown phase 'phase3'; valid: phase1, phase2"),
    ("unknown preset", "preset", "llava-v2-70b",
     "preset", r"unknown preset 'llava-v2-70b'; valid: tiny, llava-v1\.5-7b, llava-v1\.5-13b"),
    ("unknown metric", "eval.metrics.count", "bleu", "eval.metrics.count",
     r"Input should be 'exact_match', 'vqa_accuracy', 'anls', 'relaxed_accuracy', 'mc_accuracy' or 'pope' "
     r"\(got 'bleu'\)"),
    ("a sequence too short for the image patches", "hdf5.phase2.max_sequence_length", 66,
     "hdf5.phase2", r"max_sequence_length 66 leaves no room for text after 64 image patches"),
]  # fmt: skip


@pytest.fixture
def params(tmp_path) -> dict:
    return base_params(tmp_path / "ws")


def test_the_table_is_long_enough():
    assert len(BAD) >= 15 and len({case[1] for case in BAD}) == len(BAD)


@pytest.mark.parametrize(
    ("what", "key", "value", "where", "message"), BAD, ids=[re.sub(r"\W+", "-", c[0]) for c in BAD]
)
def test_each_bad_value_is_reported_with_its_key_path(tmp_path, params, what, key, value, where, message):
    at(params, key, value)
    path = write_params(tmp_path, params)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    [(reported, msg)] = ei.value.errors
    assert reported == where, what
    assert re.fullmatch(message, msg), (what, msg)
    assert str(ei.value) == f"{path.resolve()}: {where}: {msg}"  # one problem: one line


@pytest.mark.parametrize(
    ("key", "text", "value"),
    [
        ("train.phase2.learning_rate", "2e-5", 2e-05),  # YAML 1.1 reads 2e-5 (no dot) as a string
        ("train.phase1.learning_rate", '"1.5e-3"', 1.5e-03),
        ("train.phase2.global_batch_size", '"32"', 32),
        ("hdf5.phase2.max_discarded_fraction", '"0.1"', 0.1),
    ],
)
def test_numbers_written_as_strings_are_coerced(tmp_path, params, key, text, value):
    path = write_params(tmp_path, params)
    section, phase, name = key.split(".")
    lines = path.read_text().splitlines()
    # the value as a person types it into the file, under its phase
    start = next(i for i, line in enumerate(lines) if line == f"{section}:")
    start = next(i for i in range(start, len(lines)) if lines[i] == f"  {phase}:")
    lines.insert(start + 1, f"    {name}: {text}")
    path.write_text("\n".join(lines) + "\n")
    assert isinstance(yaml.safe_load(path.read_text())[section][phase][name], str)  # what YAML hands over
    cfg = load_config(path)
    got = getattr(getattr(cfg, section)[phase], name)
    assert got == value and type(got) is type(value)


def several_problems(params: dict) -> dict:
    p = copy.deepcopy(params)
    at(p, "train.phase2.learning_rate", "fast")
    at(p, "train.phase2.micro_batch_size", 0)
    at(p, "hdf5.phase1.lr", 1)
    at(p, "trian", 1)
    at(p, "eval.default_metric", "bleu")
    return p


EXPECTED = {
    "train.phase2.learning_rate": "unable to parse string as a number (got 'fast')",
    "train.phase2.micro_batch_size": "Input should be greater than 0 (got 0)",
    "hdf5.phase1": "unknown key 'lr'; valid: prompt_style, max_sequence_length, shard_size, ",
    "params": "unknown key 'trian'; valid: preset, seed, ",
    "eval.default_metric": "(got 'bleu')",
}


def test_every_problem_of_a_file_is_reported_together(tmp_path, params):
    path = write_params(tmp_path, several_problems(params))
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    found = dict(ei.value.errors)
    assert len(ei.value.errors) == len(found) == len(EXPECTED)
    for where, part in EXPECTED.items():
        assert part in found[where], where
    head, *lines = str(ei.value).splitlines()
    assert head == f"{path.resolve()}: {len(EXPECTED)} problems"
    assert lines == [f"  {where}: {msg}" for where, msg in ei.value.errors]


def test_the_cli_refuses_a_bad_file_before_any_stage_runs(tmp_path, params, capsys):
    path = write_params(tmp_path, several_problems(params))
    assert main(["--params", str(path), "hdf5", "phase1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.splitlines()
    assert err[0] == f"error: {path.resolve()}: {len(EXPECTED)} problems"
    for where, part in EXPECTED.items():
        assert any(line.startswith(f"  {where}: ") and part in line for line in err[1:]), where
    assert "Traceback" not in captured.err
    assert not (tmp_path / "ws").exists()  # no stage ran: not even a workspace folder was made
