"""Stage 4, training: one phase of the LLaVA recipe as an explicit accelerate loop, in its own process.

`train(cfg, phase)` (in `llava_core.launch`, which imports no torch) is the stage function: it writes the
resolved config next to the run and starts `accelerate launch -m llava_core.train` with the phase's
accelerate config (the Dagster asset starts the same command through Dagster Pipes). The launched process
runs `Recipe` (setup model, data, optimizer; loss step; train). It works in `checkpoints/.<phase>.partial/`: metrics, TensorBoard events and, every
`save_every` steps, a resumable checkpoint `step-<n>/` (accelerate state: trainable weights, optimizer,
scheduler, RNG states, data position), written as `.step-<n>.tmp/` and renamed when complete. A restarted
run with the same config continues from the last one; the finished checkpoint is renamed to
`checkpoints/<phase>/` only when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from llava_core.config import PipelineConfig, config_from_dict, replace_dir, write_json_atomic
from llava_core.hdf5 import LlavaHdf5Dataset, collate_trimmed
from llava_core.launch import (  # noqa: F401  (the stage function and its helpers, re-exported)
    SUMMARY,
    TrainResult,
    finished,
    launch_command,
    launch_env,
    previous_phase,
    train,
)
from llava_core.model import (
    LlavaModel,
    apply_freeze,
    apply_lora,
    build_model,
    enable_gradient_checkpointing,
    has_lora,
    load_model,
    lora_state,
    merge_lora,
    save_model,
)
from llava_core.observe import (
    LOSS_CURVE,
    METRICS,
    TrainObserver,
    flops_model,
    peak_flops,
    read_metrics,
    summary_metadata,
    train_flops,
    write_loss_curve,
)
from llava_core.sampler import DataPosition, EpochBatches, record_info
from llava_core.tokenizer import load_tokenizer

RESUME_KEY = "resume_key.json"
STEP_PREFIX = "step-"
# Settings that change what a run shows or how often it saves, not what it computes: a partial run resumes
# across a change of these.
OBSERVE_ONLY = ("log_every", "save_every", "keep_last", "num_workers", "resume", "tensorboard", "peak_tflops")


class ResumeMismatch(RuntimeError):
    """A partial run exists whose settings differ from the current ones."""


def work_dir(cfg: PipelineConfig, phase: str) -> Path:
    out = cfg.checkpoint_dir(phase)
    return out.with_name(f".{out.name}.partial")


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def resume_key(cfg: PipelineConfig, phase: str, processes: int) -> dict:
    """Everything a partial run's numbers depend on: it resumes only when all of this is unchanged."""
    tc = {k: v for k, v in dataclasses.asdict(cfg.train[phase]).items() if k not in OBSERVE_ONLY}
    tc.pop("accelerate_config")  # the launcher file may move; what it decides (processes) is kept below
    prev = previous_phase(phase)
    return {
        "preset": cfg.preset,
        "seed": cfg.seed,
        "model": dataclasses.asdict(cfg.model),
        "train": tc,
        "hdf5": dataclasses.asdict(cfg.hdf5[phase]),
        "data_params_sha256": _sha256(cfg.hdf5_dir(phase) / "data_params.json"),
        "previous_summary_sha256": _sha256(cfg.checkpoint_dir(prev) / SUMMARY) if prev else None,
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


class Recipe:
    """One training phase: `_setup_model`, `_setup_data`, `_setup_optimizer`, `_loss_step`, `train`."""

    def __init__(self, cfg: PipelineConfig, phase: str) -> None:
        from accelerate import Accelerator, PartialState
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.cfg, self.phase, self.tc = cfg, phase, cfg.train[phase]
        self.data_dir = cfg.hdf5_dir(phase)
        self.data_params = json.loads((self.data_dir / "data_params.json").read_text())
        # no GPU: CPU processes (gloo when launched as several, e.g. configs/accelerate/cpu_ddp.yaml)
        cpu = not torch.cuda.is_available()
        world = PartialState(cpu=cpu).num_processes
        if self.tc.global_batch_size % (self.tc.micro_batch_size * world):
            raise ValueError(
                f"global_batch_size {self.tc.global_batch_size} is not divisible by micro_batch_size "
                f"{self.tc.micro_batch_size} x {world} processes"
            )
        self.accum = self.tc.global_batch_size // (self.tc.micro_batch_size * world)
        self.records = record_info(self.data_dir, with_lengths=self.tc.group_by_modality_length)
        # a text-only batch leaves the projector unused: DDP must then look for unused parameters
        ddp = DistributedDataParallelKwargs(find_unused_parameters=not bool(self.records.has_image.all()))
        self.accelerator = Accelerator(
            cpu=cpu,
            gradient_accumulation_steps=self.accum,
            mixed_precision=self.tc.mixed_precision,
            step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the world size
            kwargs_handlers=[ddp],
        )
        set_seed(cfg.seed)
        self.out = cfg.checkpoint_dir(phase)
        self.work = work_dir(cfg, phase)
        self.key = resume_key(cfg, phase, world)
        self.observer: TrainObserver | None = None
        self._early_lines: list[str] = []

    def log(self, msg: str) -> None:
        if self.observer is not None:
            self.observer.log(msg)
        elif self.accelerator.is_main_process:
            print(f"[{self.phase}] {msg}", flush=True)
            self._early_lines.append(msg)  # sent to Dagster once the observer is up

    def _setup_model(self) -> LlavaModel:
        tok = load_tokenizer(self.cfg.resolve_file(self.cfg.model.tokenizer))
        self.tokenizer = tok
        prev = previous_phase(self.phase)
        if prev is None:
            special = {
                "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id,
            }
            model = build_model(self.cfg, len(tok), special)
        else:
            prev_dir = self.cfg.checkpoint_dir(prev)
            if not (prev_dir / SUMMARY).is_file():
                raise FileNotFoundError(f"{prev_dir} holds no finished {prev} checkpoint: train {prev} first")
            model = load_model(prev_dir)  # model state only; optimizer state starts fresh
        vocab = model.text_model.get_input_embeddings().num_embeddings
        if self.data_params["vocab_size"] > vocab:
            raise ValueError(f"data vocab {self.data_params['vocab_size']} exceeds the model's embeddings {vocab}")
        if self.data_params["image_patch_info"]["num_patches"] != model.num_patches:
            raise ValueError(
                f"data has {self.data_params['image_patch_info']['num_patches']} image slots, "
                f"the vision tower gives {model.num_patches} patches"
            )
        self.freeze = apply_freeze(model, self.tc.freeze)
        self.log(f"freeze {self.tc.freeze}: {self.freeze.summary()}")
        if self.tc.lora is not None:
            lc = self.tc.lora
            self.freeze = apply_lora(model, lc.r, lc.alpha, lc.dropout, lc.target_modules)
            self.log(f"LoRA r={lc.r} alpha={lc.alpha} on {lc.target_modules}: {self.freeze.summary()}")
        if self.tc.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model

    def _setup_data(self) -> EpochBatches:
        acc = self.accelerator
        self.dataset = LlavaHdf5Dataset(self.data_dir, self.cfg.image_root, self.cfg.model.image_size)
        self.image_start = self.dataset.image_start
        return EpochBatches(
            self.records,
            self.tc.micro_batch_size,
            self.cfg.seed,
            acc.num_processes,
            acc.process_index,
            self.tc.group_by_modality_length,
        )

    def _loader(self, batches: list[list[int]]) -> DataLoader:
        # its own generator: creating a loader must not draw from the global RNG (resume would shift it)
        return DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.tc.num_workers,
            collate_fn=collate_trimmed,
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def _setup_optimizer(self, model: LlavaModel, steps: int):
        from transformers import get_cosine_schedule_with_warmup

        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.tc.learning_rate, betas=(0.9, 0.999))
        warmup = math.ceil(steps * self.tc.warmup_ratio)
        return opt, get_cosine_schedule_with_warmup(opt, warmup, steps)

    def _loss_step(self, model: LlavaModel, batch: dict) -> torch.Tensor:
        _, loss = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["has_image"],
            self.image_start,
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
        )
        return loss

    # --- checkpoints --------------------------------------------------------------------------------------
    def _register_checkpointing(self, position: DataPosition) -> None:
        """Resumable checkpoints hold the trainable weights only (the frozen ones are rebuilt identically)."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        acc.register_for_checkpointing(position)
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return  # those save their own (sharded) full states

        def only_trainable(models, weights, _output_dir) -> None:
            for i, weights_i in enumerate(weights):
                keep = {n for n, p in models[i].named_parameters() if p.requires_grad}
                weights[i] = {k: v for k, v in weights_i.items() if k in keep}

        acc.register_save_state_pre_hook(only_trainable)

    def _check_saved_keys(self, model, folder: Path) -> None:
        from safetensors import safe_open

        path = folder / "model.safetensors"
        if not path.is_file():
            return  # FSDP / DeepSpeed layouts
        with safe_open(str(path), "pt") as f:
            saved = set(f.keys())
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if saved != expected:
            raise ResumeMismatch(
                f"{folder} holds other trainable weights than this run has "
                f"(missing {sorted(expected - saved)[:3]}, unexpected {sorted(saved - expected)[:3]})"
            )

    def _save_checkpoint(self, step: int) -> None:
        """accelerate state into `.step-<n>.tmp/`, renamed to `step-<n>/` when every rank is done."""
        acc = self.accelerator
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

    def _prepare_work(self) -> Path | None:
        """Find the checkpoint to resume from (main process decides), or start an empty work folder."""
        acc = self.accelerator
        resume = None
        if acc.is_main_process:
            resume = find_resume(self.work, self.key, self.tc.resume, self.phase)
            if resume is None:
                shutil.rmtree(self.work, ignore_errors=True)
                self.work.mkdir(parents=True)
                write_json_atomic(self.work / RESUME_KEY, self.key)
            for tmp in self.work.glob(f".{STEP_PREFIX}*.tmp"):  # a checkpoint the killed run did not finish
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        flag = [str(resume) if resume else ""]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(flag, from_process=0)
        return Path(flag[0]) if flag[0] else None

    # --- the loop ---------------------------------------------------------------------------------------
    def train(self) -> dict:
        acc = self.accelerator
        model = self._setup_model()
        batches = self._setup_data()
        steps_per_epoch = max(1, math.ceil(len(batches) / self.accum))
        total_steps = max(1, math.ceil(len(batches) * self.tc.epochs / self.accum))
        optimizer, scheduler = self._setup_optimizer(model, total_steps)
        fm = flops_model(model)
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        pos = DataPosition()
        self._register_checkpointing(pos)
        resume = self._prepare_work()
        if resume is not None:
            self._check_saved_keys(model, resume)
            acc.load_state(str(resume), strict=False)  # strict=False: frozen weights are not in it (checked above)
        start_step = pos.step
        self.observer = TrainObserver(
            self.work, self.phase, total_steps, start_step, acc.is_main_process, self.tc.tensorboard
        )
        self.observer.replay(self._early_lines)
        if resume is not None:
            self.log(f"resumed from {resume.name}: step {pos.step}, epoch {pos.epoch}, batch {pos.offset}")
        self.log(
            f"{len(self.dataset)} examples, {total_steps} optimizer steps of {self.tc.global_batch_size} "
            f"({acc.num_processes} process(es) x {self.tc.micro_batch_size} x {self.accum} accumulation)"
        )
        device_name = torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else None
        peak = peak_flops(device_name, self.tc.peak_tflops)

        t0, last = time.perf_counter(), None
        totals = {"tokens": 0, "samples": 0}
        window = self._new_window()
        model.train()
        while pos.step < total_steps:
            epoch_batches = batches(pos.epoch)
            for batch in self._loader(epoch_batches[pos.offset :]):
                pos.offset += 1
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                with acc.accumulate(model):
                    loss = self._loss_step(model, batch)
                    acc.backward(loss)
                    grad_norm = None
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(
                            [p for p in model.parameters() if p.requires_grad], self.tc.max_grad_norm
                        )
                    optimizer.step()
                    if acc.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                window["loss"] += loss.detach().float().item()
                window["n"] += 1
                window["tokens"] += int(batch["attention_mask"].sum())
                window["samples"] += batch["input_ids"].shape[0]
                window["images"] += int(batch["has_image"].sum())
                window["length"] += batch["input_ids"].shape[1]
                if not acc.sync_gradients:
                    continue
                pos.step += 1
                self.observer.advance()
                if pos.step % self.tc.log_every == 0 or pos.step == total_steps:
                    last = self._log_window(window, pos, scheduler, grad_norm, steps_per_epoch, fm, peak, totals)
                    window = self._new_window()
                if self.tc.save_every and pos.step % self.tc.save_every == 0 and pos.step < total_steps:
                    t_save = time.perf_counter()
                    self._save_checkpoint(pos.step)
                    window["t"] += time.perf_counter() - t_save  # the window's rates measure training alone
                if pos.step >= total_steps:
                    break
            else:  # the epoch ran out (an accumulation group may go on in the next one)
                pos.epoch, pos.offset = pos.epoch + 1, 0

        acc.wait_for_everyone()
        seconds = time.perf_counter() - t0
        records = read_metrics(self.work / METRICS) if acc.is_main_process else []
        summary = {
            "phase": self.phase,
            "steps": pos.step,
            "final_loss": records[-1]["loss"] if records else None,
            "first_loss": records[0]["loss"] if records else None,
            "examples": len(self.dataset),
            "global_batch_size": self.tc.global_batch_size,
            "processes": acc.num_processes,
            "seconds": seconds,
            "resumed_from_step": start_step if resume is not None else None,
            "tokens_per_s": totals["tokens"] / seconds,
            "samples_per_s": totals["samples"] / seconds,
            "mfu": last.get("mfu") if last else None,
            "trainable_parameters": self.freeze.trainable,
            "total_parameters": self.freeze.trainable + self.freeze.frozen,
            "image_patch_start_idx": self.image_start,
            "lora": dataclasses.asdict(self.tc.lora) if self.tc.lora else None,
        }
        self._save_final(model, summary, records)
        return summary

    @staticmethod
    def _new_window() -> dict:
        return {"loss": 0.0, "n": 0, "tokens": 0, "samples": 0, "images": 0, "length": 0, "t": time.perf_counter()}

    def _log_window(self, window, pos, scheduler, grad_norm, steps_per_epoch, fm, peak, totals) -> dict:
        """Reduce the window over the processes and record it (loss: mean over ranks; counts: sums)."""
        acc = self.accelerator
        local = torch.tensor(
            [window["loss"] / window["n"], window["tokens"], window["samples"], window["images"], window["length"]],
            dtype=torch.float64,
            device=acc.device,
        )
        g = acc.reduce(local, reduction="sum").tolist() if acc.num_processes > 1 else local.tolist()
        dt = time.perf_counter() - window["t"]
        tokens, samples, images = g[1], g[2], g[3]
        totals["tokens"] += tokens
        totals["samples"] += samples
        rec = {
            "step": pos.step,
            "loss": g[0] / acc.num_processes,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tokens / dt,
            "samples_per_s": samples / dt,
            "epoch": pos.step / steps_per_epoch,
        }
        if peak:
            seq_len = g[4] / (window["n"] * acc.num_processes)
            rec["mfu"] = train_flops(fm, int(tokens), int(images), int(seq_len)) / dt / (peak * acc.num_processes)
        self.observer.record(rec)
        self.log(
            f"step {rec['step']} loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s"
            + (f" mfu {rec['mfu']:.3f}" if "mfu" in rec else "")
        )
        return rec

    def _save_final(self, model, summary: dict, records: list[dict]) -> None:
        """The finished checkpoint: merged weights (+ LoRA adapters), tokenizer, config, metrics, summary."""
        acc = self.accelerator
        unwrapped = acc.unwrap_model(model)
        lora = has_lora(unwrapped)
        state = None if lora else acc.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards on the main process
        if acc.is_main_process:
            if lora:
                from safetensors.torch import save_file

                adapters, adapter_cfg = lora_state(unwrapped)
                (self.work / "adapter").mkdir(exist_ok=True)
                save_file(
                    {k: v.contiguous().cpu() for k, v in adapters.items()},
                    str(self.work / "adapter/adapter_model.safetensors"),
                )
                write_json_atomic(self.work / "adapter/adapter_config.json", adapter_cfg)
                merge_lora(unwrapped)
            save_model(unwrapped, self.work, state)
            self.tokenizer.save_pretrained(self.work / "tokenizer")
            write_loss_curve(records, self.work / LOSS_CURVE)
            write_json_atomic(self.work / "run_config.json", self.cfg.stage_view("model", "train", "hdf5"))
            for old in step_checkpoints(self.work):  # the finished weights supersede the resume points
                shutil.rmtree(old)
            (self.work / RESUME_KEY).unlink(missing_ok=True)
            write_json_atomic(self.work / SUMMARY, summary)  # last: marks the checkpoint complete
            replace_dir(self.work, self.out)
            self.observer.finish(summary_metadata(summary, records, self.out))
        elif self.observer is not None:
            self.observer.close()
        acc.wait_for_everyone()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="One LLaVA training phase (run me under `accelerate launch`).")
    ap.add_argument("--config-json", required=True, help="resolved pipeline config written by the stage")
    ap.add_argument("--phase", required=True, choices=["phase1", "phase2"])
    args = ap.parse_args(argv)
    raw = json.loads(Path(args.config_json).read_text())
    base = Path(raw.pop("base_dir"))
    recipe = Recipe(config_from_dict(raw, base), args.phase)
    try:
        recipe.train()
    except BaseException as e:
        if recipe.observer is not None:
            recipe.observer.fail(e)
        raise


if __name__ == "__main__":
    main()
