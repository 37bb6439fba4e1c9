"""The files one stage hands to the next: their names, in one place, and the one manifest layout.

The folders themselves (`data/raw/<source>`, `data/hdf5/<phase>`, `checkpoints/<phase>`, `models/hf`, ...)
come from the workspace section of the config (`PipelineConfig.path` and friends); these are the names of
the files inside them that another stage, a test or a user reads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# stage 1: data/raw/<source>/
MANIFEST = "manifest.json"  # every file that arrived (path, bytes, sha256) and the source declaration
# beside the sources, under the image root: the image checks' cache (ignored by git and DVC; llava_core/data/image_cache.py)
IMAGE_CHECK_CACHE = "image-check-cache"
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
LOSS_PLOT = "loss_curve.png"  # loss and learning rate against step, drawn at the end of the phase
RESUME_KEY = "resume_key.json"  # inside the partial run: what a resume must match
PREEMPTED = "preempted.json"  # inside the partial run: a SIGTERM stopped it after saving a checkpoint (SLURM requeues)
SLURM_DIR = ".slurm"  # checkpoints/.slurm/: each phase's job script, its log and its Dagster Pipes messages
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
EVAL_PLOT = "eval_scores.png"  # the per-category scores as bars
# beside every stage output (llava_core/stage_guard.py): its lock, and the record of the run that made it
LOCK_FILE = ".{name}.lock"  # who holds it (pid, host, command, start time); emptied on a clean release
RUN_RECORD = ".{name}.run.json"  # fingerprint of the inputs and settings, who made it, its result

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


def tree_state(path: Path) -> str:
    """A digest of every file's path, size and modification time under `path` (no content read)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    rows = [
        (p.relative_to(path).as_posix() if p != path else "", p.stat().st_size, p.stat().st_mtime_ns) for p in files
    ]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()
