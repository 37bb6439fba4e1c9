"""Evaluation suffixes end to end (issue 19): one DVQA-format source of bare single questions, converted twice
(without the converter option, and with `suffix: short_answer`), both datasets trained on the tiny preset, then
evaluated with `auto` and with each fixed suffix. Three categories ask the same questions: `bare` and `suffixed`
name their training dataset (`eval.categories.<cat>.dataset`), `mixed` reads all of the phase-2 data. The
report's shares are checked against counts made from the converted jsonl; the warning (CLI, report, Dagster
check) appears exactly for the categories asked in a form under 1% of their training questions had."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.evaluate import build_evaluate_assets
from llava_core import pipeline
from llava_core.cli import main
from llava_core.data.prompts import PROMPT_SUFFIXES
from llava_core.data.synthetic import CAPTION_PROMPTS
from llava_core.params import load_config
from orchestration.resources import PipelineSettings
from tests.conftest import e2e_params
from tests.helpers_unit import write_params

pytestmark = pytest.mark.e2e

SHORT = PROMPT_SUFFIXES["short_answer"]
QUESTIONS_PER_IMAGE = 2  # phase 2: about 120 examples per dataset
HELD_OUT = 12  # held-out questions, each asked in the three categories
CATEGORIES = {"bare": "vqa_bare", "suffixed": "vqa_suffixed", "mixed": None}


def dvqa_source(synthetic: Path, origin: Path) -> None:
    """DVQA's layout (qa/train_qa.json, images/) from the synthetic instructions, questions without any suffix
    (as Cerebras' converters write them), and the held-out questions once per category (eval.jsonl)."""
    questions = []
    for rec in json.loads((synthetic / "instruct.json").read_text()):
        if "image" not in rec:
            continue
        name = Path(rec["image"]).name
        shutil.copy(synthetic / rec["image"], origin / "images" / name)
        turns = rec["conversations"]
        pairs = [(h["value"], g["value"]) for h, g in zip(turns[::2], turns[1::2], strict=True)]
        bare = [(q.replace("<image>\n", "").replace(f"\n{SHORT}", ""), a) for q, a in pairs if q not in CAPTION_PROMPTS]
        for q, a in bare[:QUESTIONS_PER_IMAGE]:
            questions.append({"question_id": len(questions), "image": name, "question": q, "answer": a})
    (origin / "qa" / "train_qa.json").write_text(json.dumps(questions))
    shutil.copytree(synthetic / "eval_images", origin / "eval_images")
    held_out = [json.loads(line) for line in (synthetic / "eval_questions.jsonl").read_text().splitlines()][:HELD_OUT]
    with open(origin / "eval.jsonl", "w") as f:
        for cat in CATEGORIES:
            for q in held_out:
                f.write(json.dumps({**q, "question_id": f"{cat}-{q['question_id']}", "category": cat}) + "\n")


def params_with(raw: dict, folder: Path, setting: str) -> Path:
    raw = json.loads(json.dumps(raw))
    raw["eval"]["prompt_suffix"] = setting
    return write_params(folder, raw, name=f"params_{setting}.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """The workspace after download, convert, hdf5, train (both phases) and export; the params as a dict."""
    root = tmp_path_factory.mktemp("suffix_e2e")
    raw = yaml.safe_load(e2e_params(root).read_text())
    cfg = load_config(write_params(root, raw))
    pipeline.run_download(cfg, "synthetic_shapes")
    origin = root / "vqa_origin"
    (origin / "images").mkdir(parents=True)
    (origin / "qa").mkdir()
    dvqa_source(cfg.raw_dir("synthetic_shapes"), origin)
    raw["sources"]["shapes_vqa"] = {"kind": "local", "location": str(origin)}
    dvqa = {"source": "shapes_vqa", "file": "qa/train_qa.json", "converter": "dvqa", "phase": "phase2"}
    raw["datasets"] = {
        "shapes_pretrain": raw["datasets"]["shapes_pretrain"],
        "vqa_bare": dvqa,
        "vqa_suffixed": {**dvqa, "options": {"suffix": "short_answer"}},
    }
    raw["eval"] = {
        "questions": "shapes_vqa/eval.jsonl",
        "image_folder": "shapes_vqa",
        "batch_size": 64,
        "max_new_tokens": 4,
        "categories": {c: {"dataset": d} for c, d in CATEGORIES.items() if d},
    }
    cfg = load_config(params_with(raw, root, "auto"))
    pipeline.run_download(cfg, "shapes_vqa")
    for name in cfg.datasets:
        pipeline.run_convert(cfg, name)
    for phase in ("phase1", "phase2"):
        pipeline.run_hdf5(cfg, phase)
        pipeline.run_train(cfg, phase)
    pipeline.run_export(cfg)
    return root, raw


def training_share(root: Path, category: str, name: str) -> float:
    """The share of the category's training questions ending with suffix `name`, counted in the jsonl files."""
    datasets = [CATEGORIES[category]] if CATEGORIES[category] else ["vqa_bare", "vqa_suffixed"]
    turns = []
    for d in datasets:
        for line in (root / "data" / "jsonl" / f"{d}.jsonl").read_text().splitlines():
            turns += [t["value"] for t in json.loads(line)["conversations"][::2]]
    ends = [("short_answer" if t.endswith(f"\n{SHORT}") else "none") for t in turns]
    return ends.count(name) / len(ends)


def check_report(root: Path, report: dict, suffixes: dict[str, str]) -> list[str]:
    """The report's suffix section against the jsonl counts and the prompts; returns the warned categories."""
    section = report["prompt_suffix"]
    assert section["training_statistics"] == "data/hdf5/phase2/data_params.json"
    for cat, name in suffixes.items():
        entry = section["by_category"][cat]
        assert entry["suffix"] == name
        assert entry["training_share"] == pytest.approx(training_share(root, cat, name))
        assert entry["training_dataset"] == CATEGORIES[cat]
    answers = [json.loads(line) for line in (root / "reports" / "answers.jsonl").read_text().splitlines()]
    held_out = {q["question_id"]: q for q in map(json.loads, (root / "data/raw/shapes_vqa/eval.jsonl").open())}
    for a in answers:  # what the model was asked
        suffix = PROMPT_SUFFIXES[suffixes[a["category"]]]
        text = held_out[a["question_id"]]["text"]
        assert a["prompt"] == (f"{text}\n{suffix}" if suffix else text)
    warned = [w.split("'")[1] for w in report["warnings"]]
    for w, cat in zip(report["warnings"], warned, strict=True):
        assert f"category {cat!r} is asked with suffix {suffixes[cat]!r}" in w
    return warned


def materialize_report(root: Path, params: Path) -> tuple[dict, dg.AssetCheckEvaluation]:
    """The `eval_report` asset on a real (temporary) Dagster instance; the report and its suffix check."""
    cfg = load_config(params)
    home = root / f"dagster_home_{params.stem}"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        result = dg.materialize(
            build_evaluate_assets(cfg),
            instance=instance,
            resources={"settings": PipelineSettings(params_path=str(params))},
        )
    assert result.success
    [check] = result.get_asset_check_evaluations()
    return json.loads((root / "reports" / "eval.json").read_text()), check


def test_the_training_data_carries_the_suffix_only_where_converted_with_it(trained):
    root, _ = trained
    assert training_share(root, "bare", "none") == 1.0
    assert training_share(root, "suffixed", "short_answer") == 1.0
    assert training_share(root, "mixed", "short_answer") == pytest.approx(0.5)
    params = json.loads((root / "data/hdf5/phase2/data_params.json").read_text())
    n = len((root / "data/jsonl/vqa_bare.jsonl").read_text().splitlines())
    assert params["discarded"] == 0 and params["examples"] == 2 * n
    assert params["question_suffixes"] == {
        "vqa_bare": {"short_answer": 0, "multiple_choice": 0, "none": n},
        "vqa_suffixed": {"short_answer": n, "multiple_choice": 0, "none": 0},
    }


def test_auto_asks_each_category_as_its_training_data_and_the_check_passes(trained):
    root, raw = trained
    report, check = materialize_report(root, params_with(raw, root, "auto"))
    suffixes = {"bare": "none", "suffixed": "short_answer", "mixed": "short_answer"}
    assert check_report(root, report, suffixes) == []
    assert check.passed and check.check_name == "prompt_suffixes"


def test_a_suffix_the_training_data_never_had_fails_the_check_with_a_warning(trained):
    root, raw = trained
    report, check = materialize_report(root, params_with(raw, root, "short_answer"))
    suffixes = dict.fromkeys(CATEGORIES, "short_answer")
    assert check_report(root, report, suffixes) == ["bare"]  # 0% of vqa_bare; 100% and 50% elsewhere
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "category 'bare' is asked with suffix 'short_answer'" in check.metadata["warnings"].value


@pytest.mark.parametrize(
    ("setting", "warned"), [("none", ["suffixed"]), ("multiple_choice", ["bare", "mixed", "suffixed"])]
)
def test_the_cli_prints_the_warnings(trained, capsys, setting, warned):
    root, raw = trained
    capsys.readouterr()
    assert main(["--params", str(params_with(raw, root, setting)), "evaluate"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    report = json.loads((root / "reports" / "eval.json").read_text())
    assert check_report(root, report, dict.fromkeys(CATEGORIES, setting)) == warned
    assert err == [f"warning: {w}" for w in report["warnings"]]
