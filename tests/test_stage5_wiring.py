"""Stage 5 wiring: the CLI subcommands, the order in `run_all`, and the DVC stages (one implementation each)."""

from __future__ import annotations

import json

import pytest
import yaml

from llava_core import pipeline
from llava_core.cli import main
from llava_core.data.tokenizer import load_tokenizer
from llava_core.params import load_config
from tests.helpers_models import eval_workspace, write_checkpoint
from tests.helpers_unit import PROJECT, base_params, write_params


def test_export_llava_and_import_hf_commands(tmp_path, capsys):
    params = eval_workspace(tmp_path / "ws")
    cfg = load_config(params)
    write_checkpoint(cfg, load_tokenizer(cfg.resolve_file(cfg.model.tokenizer)))
    assert main(["--params", str(params), "export-llava"]) == 0
    printed = json.loads(capsys.readouterr().out)
    llava = cfg.path("models") / "llava"
    assert printed["path"] == str(llava) and printed["text_model"] == str(llava / "text_model_llava")
    assert (llava / "text_model_llava" / "config.json").is_file() and (llava / "image_model" / "config.json").is_file()
    assert main(["--params", str(params), "export"]) == 0
    capsys.readouterr()
    assert main(["--params", str(params), "import-hf", str(cfg.path("models") / "hf")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(cfg.path("checkpoints") / "imported")
    assert (
        result["vocab_size"] == len(load_tokenizer(cfg.resolve_file(cfg.model.tokenizer)))
        and result["trimmed_rows"] == 0
    )
    assert (cfg.path("checkpoints") / "imported" / "train_summary.json").is_file()


def test_run_all_exports_both_formats_before_evaluating(tmp_path, monkeypatch):
    cfg = load_config(eval_workspace(tmp_path))
    calls = []
    for name in ("download", "convert", "hdf5", "validate", "train", "export", "export_llava", "evaluate"):
        monkeypatch.setattr(pipeline, f"run_{name}", lambda cfg, *a, _n=name: calls.append(_n) or {})
    pipeline.run_all(cfg, log=lambda msg: None)
    assert calls[-3:] == ["export", "export_llava", "evaluate"]


def test_stage_log_has_one_line_per_command(tmp_path, monkeypatch):
    """LLAVA_STAGE_LOG: each stage command appends its name, seconds, exit status and peak RSS (failures too)."""
    params = write_params(tmp_path, base_params(tmp_path))
    log = tmp_path / "stages.jsonl"
    monkeypatch.setenv("LLAVA_STAGE_LOG", str(log))
    assert main(["--params", str(params), "download", "synthetic_shapes"]) == 0
    with pytest.raises(KeyError, match="unknown dataset"):
        main(["--params", str(params), "convert", "no_such_dataset"])
    done, failed = (json.loads(line) for line in log.read_text().splitlines())
    assert done["stage"] == "download synthetic_shapes" and done["exit"] == 0
    assert done["seconds"] >= 0 and done["peak_rss_mib"] > 10  # at least the interpreter
    assert failed["stage"] == "convert no_such_dataset" and failed["exit"] == 1


def test_stages_are_the_cli_commands_in_dependency_order(tmp_path):
    cfg = load_config(eval_workspace(tmp_path))
    assert [" ".join(s.cli) for s in pipeline.stages(cfg)] == [
        "download synthetic_shapes",
        "convert shapes_pretrain",
        "convert shapes_instruct",
        "hdf5 phase1",
        "hdf5 phase2",
        "validate phase1",
        "validate phase2",
        "train phase1",
        "train phase2",
        "export",
        "export-llava",
        "evaluate",
    ]


def test_dvc_stages_for_stage_5():
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    llava = stages["export_llava"]
    assert llava["cmd"] == "llava-pipeline export-llava"
    assert llava["outs"] == ["models/llava"]
    assert {"checkpoints/phase2", "llava_core/model/formats.py"} <= set(llava["deps"])
    ev = stages["evaluate"]
    assert {"reports/eval.json": {"cache": False}} in ev["metrics"]
    assert {"llava_core/evaluation/evaluate.py", "llava_core/evaluation/metrics.py", "llava_core/evaluation/judge.py"} <= set(ev["deps"])


def test_params_without_the_new_keys_still_load(tmp_path):
    cfg = load_config(eval_workspace(tmp_path))  # no judge, no publish
    assert cfg.eval.judge is None and cfg.publish is None
    project = load_config(PROJECT / "params.yaml")
    assert project.eval.prompt_suffix == "Answer the question using a single word or phrase."
    assert project.eval.metrics["exists"] == "pope"
