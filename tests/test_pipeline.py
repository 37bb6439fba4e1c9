"""The stage table (`llava_core.pipeline`) and its users: the CLI subcommands, the order of `run_all`, the stage log
(dvc.yaml, generated from the table: tests/test_dvc_yaml.py)."""

from __future__ import annotations

import dataclasses
import json

import torch
import yaml
from safetensors.torch import load_file

from llava_core import pipeline
from llava_core.cli import main
from llava_core.data.tokenizer import load_tokenizer
from llava_core.params import load_config
from tests.helpers_models import eval_workspace, write_checkpoint
from tests.helpers_unit import PROJECT, base_params, write_params


def test_export_and_import_commands(tmp_path, capsys):
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
    # the original-LLaVA export comes back to the same weights through `import-llava`
    back = cfg.path("checkpoints") / "from_llava"
    assert main(["--params", str(params), "import-llava", str(llava), "--out", str(back)]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(back)
    theirs, ours = load_file(back / "model.safetensors"), load_file(cfg.checkpoint_dir("phase2") / "model.safetensors")
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_run_all_exports_both_formats_before_evaluating(tmp_path, monkeypatch):
    cfg = load_config(eval_workspace(tmp_path))
    calls = []

    def recorder(name):
        return lambda cfg, *key: calls.append(" ".join([name, *key])) or {"ran": name}

    fakes = tuple(dataclasses.replace(s, run=recorder(s.name)) for s in pipeline.STAGES)
    monkeypatch.setattr(pipeline, "STAGES", fakes)
    logged = []
    result = pipeline.run_all(cfg, log=logged.append)
    assert calls[-3:] == ["export_hf", "export_llava", "evaluate"]
    assert calls.index("train phase2") < calls.index("export_hf")
    # the result is keyed by stage name (per key for the stages that repeat), with each step's seconds
    assert list(result) == ["seconds", *(s.name for s in pipeline.STAGES)]
    assert result["train"] == {"phase1": {"ran": "train"}, "phase2": {"ran": "train"}}
    assert result["evaluate"] == {"ran": "evaluate"}
    assert logged == [f"==> {step}" for step in result["seconds"]] and len(logged) == len(calls)


def test_stage_log_has_one_line_per_command(tmp_path, monkeypatch, capsys):
    """LLAVA_STAGE_LOG: each stage command appends its name, seconds, exit status and peak RSS (failures too)."""
    params = write_params(tmp_path, base_params(tmp_path))
    log = tmp_path / "stages.jsonl"
    monkeypatch.setenv("LLAVA_STAGE_LOG", str(log))
    assert main(["--params", str(params), "download", "synthetic_shapes"]) == 0
    # a stage that fails while it runs (its input is missing): one error line, exit status 1, logged
    capsys.readouterr()
    assert main(["--params", str(params), "hdf5", "phase1"]) == 1
    missing = tmp_path / "data" / "jsonl" / "shapes_pretrain.jsonl"
    assert capsys.readouterr().err == f"error: {missing} not found: run the conversion stage first\n"
    # a key that does not exist is refused before any stage runs: exit status 2, nothing logged
    assert main(["--params", str(params), "convert", "no_such_dataset"]) == 2
    done, failed = (json.loads(line) for line in log.read_text().splitlines())
    assert done["stage"] == "download synthetic_shapes" and done["exit"] == 0
    assert done["seconds"] >= 0 and done["peak_rss_mib"] > 10  # at least the interpreter
    assert failed["stage"] == "hdf5 phase1" and failed["exit"] == 1


def test_stages_are_the_cli_commands_in_dependency_order(tmp_path):
    cfg = load_config(eval_workspace(tmp_path))
    assert [" ".join([s.command, *([k] if k else [])]) for s, k in pipeline.steps(cfg)] == [
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
    # the modules the exports import, transitively (the model, the prompt encoder and the image transform too)
    code = {f"llava_core/{m}.py" for m in ("model/weights", "model/llava", "data/prompts", "data/images")}
    assert {"checkpoints/phase2", "llava_core/model/original.py", *code} <= set(llava["deps"])
    hf = stages["export_hf"]
    assert hf["cmd"] == "llava-pipeline export" and hf["outs"] == ["models/hf"]
    assert {"checkpoints/phase2", "llava_core/model/hf.py", *code} <= set(hf["deps"])
    ev = stages["evaluate"]
    assert {"reports/eval.json": {"cache": False}} in ev["metrics"]
    assert {f"llava_core/evaluation/{m}.py" for m in ("evaluate", "metrics", "judge")} <= set(ev["deps"])


def test_params_without_the_new_keys_still_load(tmp_path):
    cfg = load_config(eval_workspace(tmp_path))  # no judge, no publish
    assert cfg.eval.judge is None and cfg.publish is None
    project = load_config(PROJECT / "params.yaml")
    assert project.eval.prompt_suffix == "auto"  # the form the phase-2 training questions had
    assert project.eval.metrics["exists"] == "pope"
