"""The files one stage hands to the next: their names, in one place, and the one manifest layout.

The folders themselves (`data/raw/<source>`, `data/hdf5/<phase>`, `checkpoints/<phase>`, `models/hf`, ...)
come from the workspace section of the config (`PipelineConfig.path` and friends); these are the names of
the files inside them that another stage, a test or a user reads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# stage 1: data/raw/<source>/
MANIFEST = "manifest.json"  # every file that arrived (path, bytes, sha256) and the source declaration
# stage 2: data/jsonl/<dataset>.jsonl and its report
JSONL_SUFFIX = ".jsonl"
CONVERT_REPORT_SUFFIX = ".report.json"  # read / written / dropped by reason
# stage 3: data/hdf5/<phase>/ and the gate's results beside it
DATA_PARAMS = "data_params.json"  # settings, counts, token facts, the image start index
VALIDATION_SUFFIX = ".validation.json"  # data/hdf5/<phase>.validation.json
# stage 4: checkpoints/<phase>/
TRAIN_SUMMARY = "train_summary.json"  # written last: marks a finished checkpoint
RUN_CONFIG = "run_config.json"  # the resolved config part the phase depended on
MODEL_CONFIG = "model_config.json"  # the architecture: enough to rebuild the model
WEIGHTS = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
METRICS = "metrics.jsonl"  # one JSON record per logged step
LOSS_CURVE = "loss_curve.csv"  # the same records for `dvc plots`
RESUME_KEY = "resume_key.json"  # inside the partial run: what a resume must match
RUN_STATS = "run_stats.json"  # how the run went on this machine (seconds, throughput, MFU, resume), not the model
TENSORBOARD_DIR = "tensorboard"
# stage 4: reports/train/<phase>/, the DVCLive folder (kept in git: `dvc exp show`, `dvc plots`)
TRAIN_REPORTS = "train"
LIVE_METRICS = "metrics.json"  # the last value of each logged metric and the step
LIVE_PLOTS = "plots/metrics"  # one <metric>.tsv per logged metric: step and value
# stage 5: models/hf, models/llava, reports/
EXPORT_INFO = "export_info.json"  # which checkpoint, image token, what the export added
IMPORT_INFO = "import_info.json"
EVAL_REPORT = "eval.json"
ANSWERS = "answers.jsonl"
REVIEWS = "reviews.jsonl"  # the judge's reviews, one per answer

CHUNK = 1 << 20


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_manifest(folder: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> list[dict]:
    """Every file under `folder` (sorted, `/`-separated relative paths) with its size and sha256: the one
    manifest layout (downloads record it, publish uploads it)."""
    folder = Path(folder)
    return [
        {"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in exclude
    ]
