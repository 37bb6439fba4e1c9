"""The evaluation suffix of each question category, and the share of the phase-2 training questions that carried it.

The HDF5 stage counts, per dataset, the human turns that end with each `PROMPT_SUFFIXES` text (`question_suffixes`
in `data_params.json`). With `eval.prompt_suffix: auto` a category is asked the way its training questions were
asked; whatever the setting, a category asked with a suffix that under 1% of those questions carried is a warning:
its score would measure the change of prompt as much as the model (docs/evaluation.md#evaluation-suffixes).
No torch here.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from llava_core.artifacts import DATA_PARAMS
from llava_core.config import AUTO_SUFFIX, EvalConfig, PipelineConfig
from llava_core.data.prompts import PROMPT_SUFFIXES, suffix_name
from llava_core.phases import FINAL_PHASE

MIN_TRAINING_SHARE = 0.01  # a suffix fewer training questions carried counts as never trained on
FALLBACK = "short_answer"  # `auto` without training statistics: the default before `auto` existed
STATS_KEY = "question_suffixes"  # data_params.json: dataset -> suffix name -> human turns ending with it


@dataclass(frozen=True)
class TrainingSuffixes:
    """The human turns of each phase-2 dataset by the suffix they end with; `path` is None without statistics
    (no HDF5 data, e.g. an imported model, or data built before they were recorded)."""

    path: Path | None = None
    by_dataset: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def load(cls, cfg: PipelineConfig) -> TrainingSuffixes:
        path = cfg.hdf5_dir(FINAL_PHASE) / DATA_PARAMS
        if not path.is_file():
            return cls()
        stats = json.loads(path.read_text(encoding="utf-8")).get(STATS_KEY)
        return cls(path, stats) if isinstance(stats, dict) else cls()

    def counts(self, dataset: str | None) -> dict[str, int] | None:
        """Human turns per suffix name: of `dataset`, or of every dataset when None; None without statistics."""
        if self.path is None:
            return None
        if dataset is None:
            total: Counter = Counter()
            for c in self.by_dataset.values():
                total.update(c)
            return {n: total[n] for n in PROMPT_SUFFIXES}
        if dataset not in self.by_dataset:
            raise ValueError(
                f"dataset {dataset!r} (eval.categories) is not in {self.path} (datasets: "
                f"{', '.join(self.by_dataset) or 'none'}): build the {FINAL_PHASE} HDF5 data again"
            )
        return {n: self.by_dataset[dataset].get(n, 0) for n in PROMPT_SUFFIXES}


def category_dataset(ec: EvalConfig, category: str) -> str | None:
    """The training dataset a category names (`eval.categories.<category>.dataset`), else None (all of them)."""
    c = ec.categories.get(category)
    return c.dataset if c is not None else None


def question_kind(metric: str) -> str:
    """The suffix a category's kind of question takes in LLaVA-1.5's mix: option letters for multiple choice."""
    return "multiple_choice" if metric == "mc_accuracy" else "short_answer"


def auto_suffix(counts: dict[str, int] | None, kind: str) -> str:
    """`kind`'s suffix when at least 1% of the training questions carried it, else no suffix when 1% carried none,
    else `kind`'s (nothing matches: the report warns); without statistics the former default, short_answer."""
    total = sum(counts.values()) if counts else 0
    if not total:
        return FALLBACK
    return next((n for n in (kind, "none") if counts[n] / total >= MIN_TRAINING_SHARE), kind)


def category_suffix(ec: EvalConfig, category: str, stats: TrainingSuffixes) -> str:
    """The suffix name of a category's questions that name none: `eval.suffixes[category]`, else
    `eval.prompt_suffix`, which `auto` resolves from the training statistics."""
    counts = stats.counts(category_dataset(ec, category))  # checks a named dataset whatever the setting
    if category in ec.suffixes:
        return ec.suffixes[category]
    if ec.prompt_suffix != AUTO_SUFFIX:
        return ec.prompt_suffix
    return auto_suffix(counts, question_kind(ec.metrics.get(category, ec.default_metric)))


def choose_suffixes(ec: EvalConfig, categories: list[str], stats: TrainingSuffixes) -> dict[str, str]:
    """category -> suffix name, for every category of the question file (before anything is generated)."""
    return {c: category_suffix(ec, c, stats) for c in sorted(set(categories))}


def suffix_report(cfg: PipelineConfig, records: list[dict]) -> tuple[dict, list[str]]:
    """The report's `prompt_suffix` section and its warnings, from the prompts the answers were generated with.

    Per category: the suffix its prompts ended with, and the share of the training questions (of its dataset,
    else of every phase-2 dataset) that ended with it; a warning for each suffix used below MIN_TRAINING_SHARE.
    """
    stats = TrainingSuffixes.load(cfg)
    used: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        used[r["category"]][suffix_name(r["prompt"])] += 1
    by: dict[str, dict] = {}
    warnings: list[str] = []
    for cat, names in sorted(used.items()):
        dataset = category_dataset(cfg.eval, cat)
        counts = stats.counts(dataset)
        total = sum(counts.values()) if counts is not None else None
        share = {n: counts[n] / total if counts and total else None for n in names}
        name = names.most_common(1)[0][0]
        entry = {
            "suffix": name,
            "training_share": share[name],
            "training_questions": total,
            "training_dataset": dataset,
        }
        if len(names) > 1:
            entry["questions_by_suffix"] = dict(sorted(names.items()))
        by[cat] = entry
        for n in sorted(names):
            if share[n] is not None and share[n] < MIN_TRAINING_SHARE:
                warnings.append(_warning(cat, n, share[n], total, dataset))
    section = {
        "setting": cfg.eval.prompt_suffix,
        "training_statistics": cfg.rel(stats.path) if stats.path else None,
        "min_training_share": MIN_TRAINING_SHARE,
        "by_category": by,
    }
    return section, warnings


def _warning(category: str, name: str, share: float, total: int, dataset: str | None) -> str:
    where = f"dataset {dataset!r}" if dataset else f"the {FINAL_PHASE} data"
    return (
        f"category {category!r} is asked with suffix {name!r}, which {share:.1%} of the {total} training questions "
        f"of {where} carried (under {MIN_TRAINING_SHARE:.0%}): its score measures the change of prompt as much as "
        f"the model; ask it as the training data did (eval.prompt_suffix: auto, or eval.suffixes.{category}) or "
        "convert the training data with the converter option `suffix`"
    )
