"""Resumable training: the partial run's work folder, its step checkpoints, the resume key, the finished folder.

A phase works in `checkpoints/.<phase>.partial/`: metrics, TensorBoard events and, every `save_every` steps, a
resumable checkpoint `step-<n>/` (accelerate state: trainable weights, optimizer, scheduler, RNG states, data
position), written as `.step-<n>.tmp/` and renamed when complete. A restarted run with the same settings (the
resume key) continues from the last one; the finished checkpoint is renamed to `checkpoints/<phase>/` only when
complete, and the resume points are removed then (the finished weights supersede them).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from llava_core.artifacts import (
    DATA_PARAMS,
    LOSS_CURVE,
    LOSS_PLOT,
    PREEMPTED,
    RESUME_KEY,
    RUN_CONFIG,
    RUN_STATS,
    TOKENIZER_DIR,
    TRAIN_SUMMARY,
)
from llava_core.atomic import replace_dir, write_json_atomic
from llava_core.config import PipelineConfig
from llava_core.phases import get_phase

STEP_PREFIX = "step-"
# Settings that change what a run shows or how often it saves, not what it computes: a partial run resumes
# across a change of these.
# Where a run is launched (here or as a SLURM job) changes nothing either: the process count is kept below.
OBSERVE_ONLY = ("log_every", "save_every", "keep_last", "num_workers", "resume", "trackers", "peak_tflops",
                "launcher", "slurm")  # fmt: skip
# The summary figures of how this run went on this machine (wall clock, throughput, MFU, a resume): written to
# run_stats.json, not train_summary.json, so the checkpoint's DVC hash is the same for the same settings on any
# machine (.dvcignore leaves run_stats.json, metrics.jsonl and tensorboard/ out of the hash).
RUN_STATS_KEYS = ("seconds", "tokens_per_s", "samples_per_s", "mfu", "resumed_from_step", "slurm_job_id")


class ResumeMismatch(RuntimeError):
    """A partial run exists whose settings differ from the current ones."""


def work_dir(cfg: PipelineConfig, phase: str) -> Path:
    out = cfg.checkpoint_dir(phase)
    return out.with_name(f".{out.name}.partial")


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def resume_key(cfg: PipelineConfig, phase: str, processes: int) -> dict:
    """Everything a partial run's numbers depend on: it resumes only when all of this is unchanged."""
    tc = {k: v for k, v in cfg.train[phase].model_dump().items() if k not in OBSERVE_ONLY}
    tc.pop("accelerate_config")  # the launcher file may move; what it decides (processes) is kept below
    prev = get_phase(phase).previous
    return {
        "preset": cfg.preset,
        "seed": cfg.seed,
        "model": cfg.model.model_dump(),
        "train": tc,
        "hdf5": cfg.hdf5[phase].model_dump(),
        "data_params_sha256": _sha256(cfg.hdf5_dir(phase) / DATA_PARAMS),
        "previous_summary_sha256": _sha256(cfg.checkpoint_dir(prev) / TRAIN_SUMMARY) if prev else None,
        "processes": processes,
    }


def _diff(a: object, b: object, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{where}.{k}".lstrip("."))]
    return [] if a == b else [where or "<root>"]


def step_checkpoints(work: Path) -> list[Path]:
    """The complete resumable checkpoints of a partial run, oldest first (temporary ones are not listed)."""
    if not work.is_dir():
        return []
    return sorted(p for p in work.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))


def find_resume(work: Path, key: dict, mode: str, phase: str) -> Path | None:
    """The checkpoint to continue from, None for a fresh start; a partial run of other settings is an error."""
    steps = step_checkpoints(work)
    if mode == "never" or not steps or not (work / RESUME_KEY).is_file():
        return None
    stored = json.loads((work / RESUME_KEY).read_text())
    changed = _diff(stored, key)
    if changed:
        raise ResumeMismatch(
            f"{work} holds a partial {phase} run (last checkpoint {steps[-1].name}) made with other settings: "
            f"{', '.join(changed)} changed. Restore them to resume, or start over with "
            f"train.{phase}.resume: never (or delete {work})."
        )
    return steps[-1]


class Checkpointer:
    """The checkpoints of one phase's run under accelerate: resume points while it runs, the finished folder."""

    def __init__(self, accelerator, cfg: PipelineConfig, phase: str, log: Callable[[str], None]) -> None:
        self.acc, self.cfg, self.phase, self.log = accelerator, cfg, phase, log
        self.tc = cfg.train[phase]
        self.out = cfg.checkpoint_dir(phase)
        self.work = work_dir(cfg, phase)
        self.key = resume_key(cfg, phase, accelerator.num_processes)

    def register(self, position) -> None:
        """Save the data position with the state; resumable checkpoints hold the trainable weights only (the
        frozen ones are rebuilt identically)."""
        from accelerate.utils import DistributedType

        self.acc.register_for_checkpointing(position)
        if self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return  # those save their own (sharded) full states

        def only_trainable(models, weights, _output_dir) -> None:
            for i, weights_i in enumerate(weights):
                keep = {n for n, p in models[i].named_parameters() if p.requires_grad}
                weights[i] = {k: v for k, v in weights_i.items() if k in keep}

        self.acc.register_save_state_pre_hook(only_trainable)

    def prepare(self) -> Path | None:
        """The checkpoint to resume from (the main process decides), or an empty work folder."""
        acc = self.acc
        resume = None
        if acc.is_main_process:
            resume = find_resume(self.work, self.key, self.tc.resume, self.phase)
            if resume is None:
                shutil.rmtree(self.work, ignore_errors=True)
                self.work.mkdir(parents=True)
                write_json_atomic(self.work / RESUME_KEY, self.key)
            for tmp in self.work.glob(f".{STEP_PREFIX}*.tmp"):  # a checkpoint the killed run did not finish
                shutil.rmtree(tmp)
            (self.work / PREEMPTED).unlink(missing_ok=True)
        acc.wait_for_everyone()
        flag = [str(resume) if resume else ""]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(flag, from_process=0)
        return Path(flag[0]) if flag[0] else None

    def save_preempted(self, step: int) -> None:
        """A SIGTERM stopped the run: a resume point at this step (unless one was just saved), then the marker the
        SLURM job script reads to requeue the job."""
        if not (self.work / f"{STEP_PREFIX}{step:08d}").is_dir():
            self.save_step(step)
        if self.acc.is_main_process:
            write_json_atomic(self.work / PREEMPTED, {"step": step})
            self.log(f"stopped by SIGTERM after step {step}: resume point saved, a restart continues from it")
        self.acc.wait_for_everyone()

    def load(self, model, folder: Path) -> None:
        """Restore a resume point after checking it holds exactly this run's trainable weights."""
        from safetensors import safe_open

        path = folder / "model.safetensors"
        if path.is_file():  # FSDP / DeepSpeed layouts are checked by their own loaders
            with safe_open(str(path), "pt") as f:
                saved = set(f.keys())
            expected = {n for n, p in model.named_parameters() if p.requires_grad}
            if saved != expected:
                raise ResumeMismatch(
                    f"{folder} holds other trainable weights than this run has "
                    f"(missing {sorted(expected - saved)[:3]}, unexpected {sorted(saved - expected)[:3]})"
                )
        self.acc.load_state(str(folder), strict=False)  # strict=False: frozen weights are not in it

    def save_step(self, step: int) -> None:
        """accelerate state into `.step-<n>.tmp/`, renamed to `step-<n>/` when every rank is done."""
        acc = self.acc
        final = self.work / f"{STEP_PREFIX}{step:08d}"
        tmp = self.work / f".{final.name}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            tmp.rename(final)
            for old in step_checkpoints(self.work)[: -self.tc.keep_last]:
                shutil.rmtree(old)
            self.log(f"checkpoint {final.name}")
        acc.wait_for_everyone()

    def save_final(self, model, tokenizer, summary: dict, records: list[dict], observer) -> None:
        """The finished checkpoint: merged weights (+ LoRA adapters), tokenizer, config, metrics, summary."""
        from llava_core.model.llava import has_lora, save_model
        from llava_core.plots import loss_plot
        from llava_core.training.observe import summary_metadata, write_loss_curve

        acc = self.acc
        unwrapped = acc.unwrap_model(model)
        lora = has_lora(unwrapped)
        state = None if lora else acc.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards on the main process
        if acc.is_main_process:
            if lora:
                self._save_adapters(unwrapped)
            save_model(unwrapped, self.work, state)
            tokenizer.save_pretrained(self.work / TOKENIZER_DIR)
            write_loss_curve(records, self.work / LOSS_CURVE)
            png = loss_plot(records, self.work / LOSS_PLOT, self.phase) if records else None
            write_json_atomic(self.work / RUN_CONFIG, self.cfg.stage_view("model", "train", "hdf5"))
            for old in step_checkpoints(self.work):  # the finished weights supersede the resume points
                shutil.rmtree(old)
            (self.work / RESUME_KEY).unlink(missing_ok=True)
            write_json_atomic(self.work / RUN_STATS, {k: summary.get(k) for k in RUN_STATS_KEYS})
            kept = {k: v for k, v in summary.items() if k not in RUN_STATS_KEYS}
            write_json_atomic(self.work / TRAIN_SUMMARY, kept)  # last: marks the checkpoint complete
            live = observer.end_trackers()
            report = self.cfg.train_report_dir(self.phase)
            if live is not None:  # the tracker folder first: a finished checkpoint always has its report
                report.parent.mkdir(parents=True, exist_ok=True)
                replace_dir(live, report)
            else:
                shutil.rmtree(report, ignore_errors=True)  # no stale report of another run (DVC declares it)
                report.mkdir(parents=True)
            replace_dir(self.work, self.out)
            observer.finish(summary_metadata(summary, records, self.out, png))
        elif observer is not None:
            observer.close()
        acc.wait_for_everyone()

    def _save_adapters(self, model) -> None:
        """The LoRA adapters as peft saves them (`adapter/`), then merged into the weights."""
        from safetensors.torch import save_file

        from llava_core.model.llava import lora_state, merge_lora

        adapters, adapter_cfg = lora_state(model)
        (self.work / "adapter").mkdir(exist_ok=True)
        save_file(
            {k: v.contiguous().cpu() for k, v in adapters.items()}, str(self.work / "adapter/adapter_model.safetensors")
        )
        write_json_atomic(self.work / "adapter/adapter_config.json", adapter_cfg)
        merge_lora(model)
