"""Evaluation suffixes against the training data (issue 19): `auto`'s choice per category, the share of training
questions each used suffix had, the warning under 1%, the config keys, the Dagster check's verdict. No model here:
tests/evaluation/test_suffixes_e2e.py trains one."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from assets.evaluate import suffix_check
from llava_core.config import ConfigError, EvalConfig
from llava_core.data.prompts import PROMPT_SUFFIXES, suffix_name, with_suffix
from llava_core.evaluation.suffixes import (
    MIN_TRAINING_SHARE,
    TrainingSuffixes,
    auto_suffix,
    category_suffix,
    choose_suffixes,
    suffix_report,
)
from llava_core.params import config_from_dict, load_config
from tests.helpers_unit import PROJECT, base_params, write_params

SHORT, MC = PROMPT_SUFFIXES["short_answer"], PROMPT_SUFFIXES["multiple_choice"]


def counts(short: int = 0, mc: int = 0, none: int = 0) -> dict[str, int]:
    return {"short_answer": short, "multiple_choice": mc, "none": none}


def test_suffix_name_reads_the_end_of_a_question():
    assert suffix_name(f"<image>\nWhat color?\n{SHORT}") == "short_answer"
    assert suffix_name(f"Which one?\nA. x\nB. y\n{MC}\n<image>") == "multiple_choice"  # the placeholder aside
    assert suffix_name(f"{SHORT}\nWhat color?") == "none"  # only the end counts
    assert suffix_name("What color?") == "none"
    assert suffix_name(with_suffix("What color?", SHORT)) == "short_answer"


@pytest.mark.parametrize(
    ("stats", "kind", "expected"),
    [
        (None, "short_answer", "short_answer"),  # no statistics: the former default
        (None, "multiple_choice", "short_answer"),
        (counts(), "short_answer", "short_answer"),  # no questions at all: the same
        (counts(short=100), "short_answer", "short_answer"),
        (counts(none=100), "short_answer", "none"),  # bare training questions: asked bare
        (counts(short=1, none=99), "short_answer", "short_answer"),  # 1% is enough: the model has seen it
        (counts(short=1, none=100), "short_answer", "none"),  # just under 1%
        (counts(short=50, mc=50), "multiple_choice", "multiple_choice"),
        (counts(short=100), "multiple_choice", "multiple_choice"),  # neither letter nor bare form: kind, warned
    ],
)
def test_auto_suffix_rule(stats, kind, expected):
    assert auto_suffix(stats, kind) == expected


def _cfg(tmp_path, eval_extra: dict | None = None, stats: dict | None = None):
    """The project's params with two phase-2 datasets; `stats` written as the phase-2 data_params.json."""
    params = base_params(tmp_path)
    params["datasets"]["bare_vqa"] = {**params["datasets"]["shapes_instruct"]}
    params["eval"]["metrics"]["science"] = "mc_accuracy"
    params["eval"].update(eval_extra or {})
    cfg = load_config(write_params(tmp_path, params))
    if stats is not None:
        cfg.hdf5_dir("phase2").mkdir(parents=True)
        (cfg.hdf5_dir("phase2") / "data_params.json").write_text(json.dumps({"phase": "phase2", **stats}))
    return cfg


STATS = {"question_suffixes": {"shapes_instruct": counts(short=30, mc=10, none=60), "bare_vqa": counts(none=300)}}


def test_auto_per_category_from_its_dataset_or_all(tmp_path):
    cfg = _cfg(
        tmp_path, {"categories": {"color": {"dataset": "shapes_instruct"}, "count": {"dataset": "bare_vqa"}}}, STATS
    )
    stats = TrainingSuffixes.load(cfg)
    assert stats.counts(None) == counts(short=30, mc=10, none=360)
    chosen = choose_suffixes(cfg.eval, ["color", "count", "position", "science", "color"], stats)
    # position: every dataset, 30 of 400 short answers (7.5%); science: multiple choice, 10 of 400 (2.5%)
    assert chosen == {
        "color": "short_answer",
        "count": "none",
        "position": "short_answer",
        "science": "multiple_choice",
    }


def test_explicit_settings_win_over_auto(tmp_path):
    extra = {"suffixes": {"color": "multiple_choice"}, "categories": {"count": {"dataset": "bare_vqa"}}}
    cfg = _cfg(tmp_path, extra, STATS)
    stats = TrainingSuffixes.load(cfg)
    assert category_suffix(cfg.eval, "color", stats) == "multiple_choice"  # eval.suffixes
    fixed = cfg.eval.model_copy(update={"prompt_suffix": "short_answer"})
    assert category_suffix(fixed, "count", stats) == "short_answer"  # a fixed prompt_suffix, whatever the data


def test_without_statistics_auto_is_the_former_default(tmp_path):
    cfg = _cfg(tmp_path)  # no data/hdf5/phase2: e.g. an imported model
    stats = TrainingSuffixes.load(cfg)
    assert stats.path is None and stats.counts(None) is None
    assert choose_suffixes(cfg.eval, ["color", "science"], stats) == {
        "color": "short_answer",
        "science": "short_answer",
    }
    records = [{"category": "color", "prompt": f"What color?\n{SHORT}"}]
    section, warnings = suffix_report(cfg, records)
    assert warnings == []
    assert section["training_statistics"] is None
    assert section["by_category"]["color"] == {
        "suffix": "short_answer",
        "training_share": None,
        "training_questions": None,
        "training_dataset": None,
    }


def test_data_built_before_the_statistics_counts_as_none(tmp_path):
    cfg = _cfg(tmp_path, stats={"examples": 3})  # a data_params.json without question_suffixes
    assert TrainingSuffixes.load(cfg).path is None


def test_a_named_dataset_missing_from_the_statistics_is_an_error(tmp_path):
    stats = {"question_suffixes": {"shapes_instruct": counts(short=3)}}  # built before bare_vqa was added
    cfg = _cfg(tmp_path, {"categories": {"count": {"dataset": "bare_vqa"}}}, stats)
    with pytest.raises(ValueError, match=r"dataset 'bare_vqa' \(eval.categories\) is not in .*data_params.json"):
        choose_suffixes(cfg.eval, ["count"], TrainingSuffixes.load(cfg))


def test_report_shares_and_warnings(tmp_path):
    stats = {"question_suffixes": {"shapes_instruct": counts(short=1, none=99), "bare_vqa": counts(none=100)}}
    cfg = _cfg(tmp_path, {"categories": {"count": {"dataset": "bare_vqa"}}}, stats)
    records = [
        {"category": "color", "prompt": f"What color?\n{SHORT}"},  # 1 of 200: 0.5%, warned
        {"category": "count", "prompt": "How many?"},  # bare_vqa: 100%
        {"category": "count", "prompt": f"How many?\n{SHORT}"},  # a question's own suffix: 0% of bare_vqa
        {"category": "count", "prompt": "How many now?"},
        {"category": "science", "prompt": f"Which?\nA. x\nB. y\n{MC}"},  # 0%
    ]
    section, warnings = suffix_report(cfg, records)
    assert section["setting"] == "auto" and section["min_training_share"] == MIN_TRAINING_SHARE == 0.01
    assert section["training_statistics"] == "data/hdf5/phase2/data_params.json"
    by = section["by_category"]
    assert by["color"] == {
        "suffix": "short_answer",
        "training_share": 0.005,
        "training_questions": 200,
        "training_dataset": None,
    }
    assert by["count"] == {
        "suffix": "none",
        "training_share": 1.0,
        "training_questions": 100,
        "training_dataset": "bare_vqa",
        "questions_by_suffix": {"none": 2, "short_answer": 1},
    }
    assert by["science"]["suffix"] == "multiple_choice" and by["science"]["training_share"] == 0.0
    assert [w.split(",")[0] for w in warnings] == [
        "category 'color' is asked with suffix 'short_answer'",
        "category 'count' is asked with suffix 'short_answer'",
        "category 'science' is asked with suffix 'multiple_choice'",
    ]
    assert "which 0.5% of the 200 training questions of the phase2 data carried (under 1%)" in warnings[0]
    assert "which 0.0% of the 100 training questions of dataset 'bare_vqa' carried" in warnings[1]
    # exactly 1% is enough: no warning
    stats["question_suffixes"]["shapes_instruct"] = counts(short=2, none=98)
    (cfg.hdf5_dir("phase2") / "data_params.json").write_text(json.dumps(stats))
    _, warnings = suffix_report(cfg, records[:2])
    assert warnings == []


def test_asset_check_fails_with_the_warnings_at_severity_warn():
    report = {
        "prompt_suffix": {"by_category": {"color": {"suffix": "short_answer", "training_share": 0.0}}},
        "warnings": ["category 'color' is asked with suffix 'short_answer', which 0.0% ..."],
    }
    failed = suffix_check(report)
    assert (failed.passed, failed.severity, failed.check_name) == (False, dg.AssetCheckSeverity.WARN, "prompt_suffixes")
    assert "category 'color' is asked with suffix 'short_answer'" in failed.metadata["warnings"].value
    assert "| color | short_answer | 0.0 |" in failed.metadata["suffixes"].value
    passed = suffix_check({**report, "warnings": []})
    assert passed.passed and passed.metadata["warnings"].value == "none"


# --- the config keys ----------------------------------------------------------------------------------------
def test_prompt_suffix_defaults_to_auto_and_reads_the_former_texts():
    assert EvalConfig(questions="q", image_folder="i").prompt_suffix == "auto"
    assert load_config(PROJECT / "params.yaml").eval.prompt_suffix == "auto"
    for name, text in PROMPT_SUFFIXES.items():  # params files written before `auto` gave the text
        assert EvalConfig(questions="q", image_folder="i", prompt_suffix=text).prompt_suffix == name


def test_bad_suffix_settings_name_the_valid_ones(tmp_path):
    params = base_params(tmp_path)
    params["eval"]["prompt_suffix"] = "Answer briefly."
    params["eval"]["categories"] = {"color": {"dataset": "shapes_pretrain"}, "count": {"dataset": "nope"}}
    params["datasets"]["shapes_instruct"]["options"] = {"suffix": "short"}
    with pytest.raises(ConfigError) as e:
        config_from_dict(params, tmp_path)
    assert sorted(e.value.errors) == [
        ("datasets.shapes_instruct.options", "suffix 'short' is not an evaluation suffix; valid: short_answer, "
         "multiple_choice, none"),
        ("eval.categories.color.dataset", "'shapes_pretrain' is not a phase2 dataset; valid: shapes_instruct"),
        ("eval.categories.count.dataset", "'nope' is not a phase2 dataset; valid: shapes_instruct"),
        ("eval.prompt_suffix", "Input should be 'auto', 'short_answer', 'multiple_choice' or 'none' "
         "(got 'Answer briefly.')"),
    ]  # fmt: skip
