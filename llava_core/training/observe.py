"""What a training run shows: metrics JSON lines, the trackers, a progress bar, Dagster Pipes, FLOPs and MFU.

Only the main process observes. The trackers (`train.<phase>.trackers`): TensorBoard event files in the
checkpoint's `tensorboard/`; DVCLive, MLflow and W&B through accelerate's own tracker classes. DVCLive writes
`reports/train/<phase>/` (`metrics.json`, `plots/metrics/<metric>.tsv`, `params.yaml`), the folder `dvc exp
show` and `dvc plots` read, and gets only the numbers a run's settings decide (loss, learning rate, gradient
norm, epoch), so the folder, kept in git, is the same for the same settings on any machine; the throughput
figures of this machine go to metrics.jsonl, TensorBoard, MLflow and W&B. Under Dagster Pipes (the asset
launched the run with `PipesSubprocessClient`, which sets `DAGSTER_PIPES_CONTEXT`) it also streams its log lines
and each metrics record to the asset and reports the final metadata; started from the CLI or DVC the same code
runs without Pipes. This module imports `dagster_pipes` (the small protocol package), never `dagster`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_core.artifacts import LOSS_CURVE, METRICS, TENSORBOARD_DIR  # noqa: F401  (LOSS_CURVE re-exported)

log = logging.getLogger("llava_core.training")

if TYPE_CHECKING:
    from llava_core.model.llava import LlavaModel

CURVE_FIELDS = ("step", "loss", "lr", "grad_norm")
# What DVCLive records: the curve a run's settings decide (the same on any machine), not this machine's speed.
LIVE_FIELDS = ("loss", "lr", "grad_norm", "epoch")
ACCELERATE_TRACKERS = ("dvclive", "mlflow", "wandb")  # accelerate.tracking's classes; TensorBoard is our own writer
LIVE_DIR = "dvclive"  # inside the partial run; moved to reports/train/<phase>/ with the finished checkpoint
PROJECT = "llava-pipeline"  # MLflow experiment (MLFLOW_EXPERIMENT_NAME wins), W&B project (WANDB_PROJECT wins)

# Dense bf16 peak TFLOPs per device (vendor datasheets) by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0}


# --- FLOPs ------------------------------------------------------------------------------------------------
@dataclass
class FlopsModel:
    """Parameter counts that set the training FLOPs (see `train_flops`)."""

    lm_params: int  # language-model matmul weights (embedding table excluded, output head included)
    lm_trainable: int  # of which train (full fine-tuning; LoRA adapters count here)
    lm_layers: int
    lm_hidden: int
    vision_params: int
    vision_trainable: bool
    projector_params: int
    projector_trainable: bool
    patches: int  # image tokens per image (vision tower sequence = patches + 1 with CLS)


def flops_model(model: LlavaModel) -> FlopsModel:
    """Count the weights that do matmuls per token in each part of the model."""
    text = model.text_model
    table = {id(p) for p in text.get_input_embeddings().parameters()}  # a lookup, not a matmul
    lm = [(n, p) for n, p in text.named_parameters() if p.ndim >= 2 and id(p) not in table]
    vision = [p for p in model.image_model.parameters() if p.ndim >= 2]
    tcfg = getattr(text, "config", None)
    return FlopsModel(
        lm_params=sum(p.numel() for _, p in lm),
        lm_trainable=sum(p.numel() for _, p in lm if p.requires_grad),
        lm_layers=int(tcfg.num_hidden_layers),
        lm_hidden=int(tcfg.hidden_size),
        vision_params=sum(p.numel() for p in vision),
        vision_trainable=any(p.requires_grad for p in model.image_model.parameters()),
        projector_params=sum(p.numel() for p in model.projector.parameters()),
        projector_trainable=any(p.requires_grad for p in model.projector.parameters()),
        patches=model.num_patches,
    )


def train_flops(fm: FlopsModel, tokens: int, images: int, seq_len: int) -> float:
    """Training FLOPs of `tokens` attended LM tokens (sequences of about `seq_len`) and `images` images.

    A matmul weight costs 2 FLOPs per token forward, 2 more backward for the gradient of its input and 2 more
    for its own gradient when it trains (the 6N rule, split so frozen parts pay only what they do):
    - language model: 2N forward + 2N input-gradient (gradients always flow back to the projector)
      + 2N_trainable; attention scores and values add 2 * 2 * layers * seq_len * hidden per token forward,
      twice that backward (the PaLM appendix-B term, full, not halved for the causal mask);
    - projector (per patch): 2P forward + 2P input-gradient only when the vision tower trains + 2P when it trains;
    - vision tower (per patch + CLS token): 2V forward, plus 4V backward only when it trains.
    """
    lm = (4 * fm.lm_params + 2 * fm.lm_trainable) * tokens
    attention = 3 * (4 * fm.lm_layers * seq_len * fm.lm_hidden) * tokens
    patch_tokens = images * fm.patches
    proj = 2 * fm.projector_params * patch_tokens
    if fm.projector_trainable:
        proj += 2 * fm.projector_params * patch_tokens
    if fm.vision_trainable:
        proj += 2 * fm.projector_params * patch_tokens
    vision = (6 if fm.vision_trainable else 2) * fm.vision_params * images * (fm.patches + 1)
    return float(lm + attention + proj + vision)


def peak_flops(device_name: str | None, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device: the configured value, else the table for known GPUs, else None (no MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


# --- loss curve -------------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict]:
    """The metrics records; a last line cut short (by a run killed, or a disk filling up, as it wrote it) is left
    out, so the next run still resumes. A damaged line before the last is an error naming it."""
    if not Path(path).is_file():
        return []
    lines = Path(path).read_text().splitlines()
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not a metrics record") from None
    return records


def write_loss_curve(records: list[dict], path: Path) -> None:
    """The DVC plots file: one row per logged step (step, loss, lr, grad_norm)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CURVE_FIELDS})
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)


def downsample(records: list[dict], rows: int) -> list[dict]:
    """At most `rows` records, evenly spaced, always keeping the first and the last."""
    if len(records) <= rows:
        return list(records)
    picks = sorted({round(i * (len(records) - 1) / (rows - 1)) for i in range(rows)})
    return [records[i] for i in picks]


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))] for v in values)


def loss_curve_markdown(records: list[dict]) -> str:
    """The loss curve in one line for the asset's metadata: a sparkline, the first and the last loss."""
    if not records:
        return "no steps logged"
    return (
        f"loss {sparkline([r['loss'] for r in downsample(records, 60)])} "
        f"({records[0]['loss']:.4f} -> {records[-1]['loss']:.4f} over {records[-1]['step']} steps)"
    )


def summary_metadata(summary: dict, records: list[dict], folder: Path, png: bytes | None = None) -> dict[str, Any]:
    """The asset metadata of a finished phase, as Pipes metadata values (raw values are inferred); `png`: the
    picture of the loss and learning-rate curves (`loss_plot`, shown by the UI's "Show Markdown")."""
    meta: dict[str, Any] = {
        "path": {"raw_value": str(folder), "type": "path"},
        "loss_curve": {"raw_value": loss_curve_markdown(records), "type": "md"},
    }
    if png is not None:
        from llava_core.plots import png_markdown

        meta["loss_plot"] = {"raw_value": png_markdown(png, "loss and learning rate against step"), "type": "md"}
    for key in (
        "steps",
        "final_loss",
        "first_loss",
        "seconds",
        "trainable_parameters",
        "total_parameters",
        "tokens_per_s",
        "samples_per_s",
        "mfu",
        "resumed_from_step",
        "processes",
        "device_kind",
        "device_count",
        "device_name",
        "world_size",
        "machines",
        "mixed_precision",
        "torch_version",
        "cuda_version",
    ):
        if summary.get(key) is not None:
            meta[key] = summary[key]
    return meta


# --- the observer -----------------------------------------------------------------------------------------
def under_pipes() -> bool:
    """Whether a Dagster Pipes orchestrator launched this process."""
    from dagster_pipes import PipesEnvVarParamsLoader

    return PipesEnvVarParamsLoader().is_dagster_pipes_process()


def make_tracker(name: str, folder: Path, phase: str):
    """accelerate's tracker object `name`: DVCLive in the run's folder, neither saving an experiment nor editing
    dvc.yaml (the pipeline's dvc.yaml declares the folder); MLflow and W&B runs named after the phase (their
    tracking URI, mode and folder come from their own variables: MLFLOW_TRACKING_URI, WANDB_MODE, WANDB_DIR)."""
    import os

    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "dvclive":
        return cls(phase, dir=str(folder / LIVE_DIR), save_dvc_exp=False, dvcyaml=None, resume=False)
    if name == "mlflow":
        return cls(experiment_name=PROJECT, run_name=phase)
    return cls(os.environ.get("WANDB_PROJECT", PROJECT), name=phase)  # wandb: the project, then wandb.init's


def start_trackers(names: list[str], folder: Path, phase: str, config: dict) -> list:
    """accelerate's tracker objects for `names` (of ACCELERATE_TRACKERS), started, with the run's settings."""
    trackers = []
    for name in names:
        tracker = make_tracker(name, folder, phase)
        tracker.start()
        tracker.store_init_configuration(config)
        trackers.append(tracker)
    return trackers


def tracker_values(name: str, rec: dict) -> dict:
    """What tracker `name` logs of a metrics record: numbers only; DVCLive the settings-decided ones."""
    keys = LIVE_FIELDS if name == "dvclive" else rec
    return {k: rec[k] for k in keys if k != "step" and isinstance(rec.get(k), int | float)}


class TrainObserver:
    """Main-process sink for each metrics record: JSON lines, the trackers, tqdm and (under Pipes) Dagster.

    `start_step` > 0 means a resumed run: records after it (written by the killed run past its last
    checkpoint) are dropped from metrics.jsonl and TensorBoard, and the records kept are logged again to the
    other trackers (a new run of theirs), so each holds one loss curve.
    """

    def __init__(
        self,
        folder: Path,
        phase: str,
        total_steps: int,
        start_step: int,
        main: bool,
        trackers: list[str],
        config: dict | None = None,
    ) -> None:
        self.folder, self.phase, self.main = Path(folder), phase, main
        self._stack = ExitStack()
        self._pipes_stack = ExitStack()  # apart: a run stopped for a requeue leaves the Pipes session open
        self.pipes = None
        self.tb = None
        self.bar = None
        self.trackers: list = []
        if not main:
            return
        path = self.folder / METRICS
        kept = [r for r in read_metrics(path) if r["step"] <= start_step]
        tmp = path.with_name(f".{METRICS}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
        self.metrics_f = self._stack.enter_context(open(path, "a"))
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            purge = start_step + 1 if start_step else None
            self.tb = SummaryWriter(str(self.folder / TENSORBOARD_DIR), purge_step=purge)
            self._stack.callback(self.tb.close)
        names = [t for t in trackers if t in ACCELERATE_TRACKERS]
        self.trackers = start_trackers(names, self.folder, phase, config or {})
        for rec in kept:  # a resumed run: the curve so far, again
            self._log_trackers(rec)
        from tqdm import tqdm

        # disable=None: a bar on a terminal, nothing in CI logs and files
        self.bar = tqdm(total=total_steps, initial=start_step, desc=phase, unit="step", disable=None, leave=True)
        self._stack.callback(self.bar.close)
        if under_pipes():
            from dagster_pipes import open_dagster_pipes

            self.pipes = self._pipes_stack.enter_context(open_dagster_pipes())

    def log(self, msg: str) -> None:
        if not self.main:
            return
        line = f"[{self.phase}] {msg}"
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
        else:
            log.info(line)
        if self.pipes is not None:
            self.pipes.log.info(line)

    def replay(self, lines: list[str]) -> None:
        """Send lines printed before the observer existed to Dagster (they are on stdout already)."""
        if self.pipes is not None:
            for line in lines:
                self.pipes.log.info(f"[{self.phase}] {line}")

    def record(self, rec: dict) -> None:
        if not self.main:
            return
        self.metrics_f.write(json.dumps(rec) + "\n")
        self.metrics_f.flush()
        if self.tb is not None:
            for key, value in rec.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(f"train/{key}", value, rec["step"])
            self.tb.flush()
        self._log_trackers(rec)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", refresh=False)
        if self.pipes is not None:
            self.pipes.report_custom_message({"phase": self.phase, **rec})

    def _log_trackers(self, rec: dict) -> None:
        for tracker in self.trackers:
            tracker.log(tracker_values(tracker.name, rec), step=rec["step"])

    def end_trackers(self) -> Path | None:
        """Close the accelerate trackers (DVCLive writes its summary); returns DVCLive's folder, if any."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish()
        live = self.folder / LIVE_DIR
        return live if any(t.name == "dvclive" for t in trackers) and live.is_dir() else None

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def finish(self, metadata: dict[str, Any]) -> None:
        """Report the finished phase to the asset (under Pipes) and close everything."""
        if self.pipes is not None:
            self.pipes.report_asset_materialization(metadata=metadata)
        self.close()

    def close(self) -> None:
        self.end_trackers()
        self._stack.close()
        self._pipes_stack.close()

    def suspend(self) -> None:
        """Close the files but not the Dagster Pipes session: the requeued job continues it (SLURM)."""
        self._stack.close()

    def fail(self, exc: BaseException) -> None:
        """Close everything, handing the exception to Dagster (the run shows it) when under Pipes."""
        for tracker in self.trackers:  # an MLflow run ends as failed, not finished
            if tracker.name == "mlflow":
                import mlflow

                mlflow.end_run(status="FAILED")
        self.trackers = [t for t in self.trackers if t.name != "mlflow"]
        self.end_trackers()
        self._stack.__exit__(type(exc), exc, exc.__traceback__)
        self._pipes_stack.__exit__(type(exc), exc, exc.__traceback__)
