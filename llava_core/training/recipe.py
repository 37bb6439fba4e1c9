"""Stage 4, training: one phase of the LLaVA recipe as an explicit accelerate loop, in its own process.

`train(cfg, phase)` (in `llava_core.training.launch`, which imports no torch) is the stage function: it writes
the resolved config next to the run and starts `accelerate launch -m llava_core.training.recipe` with the
phase's accelerate config (the Dagster asset starts the same command through Dagster Pipes). The launched
process runs `Recipe`: `_setup_model`, `_setup_data`, `_setup_optimizer`, `_loss_step`, and `train`, the loop;
checkpoints and resuming are `checkpointing.Checkpointer`'s, what the run shows is `observe.TrainObserver`'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from llava_core.artifacts import METRICS, TRAIN_SUMMARY
from llava_core.config import PipelineConfig
from llava_core.data.tokenizer import load_tokenizer
from llava_core.model.llava import (
    DTYPES,
    LlavaModel,
    apply_freeze,
    apply_lora,
    build_model,
    enable_gradient_checkpointing,
    parameter_dtype,
)
from llava_core.model.llava import load_model as load_checkpoint
from llava_core.params import config_from_dict
from llava_core.phases import PHASE_NAMES, get_phase
from llava_core.training.checkpointing import Checkpointer
from llava_core.training.dataset import LlavaHdf5Dataset, collate_trimmed
from llava_core.training.devices import set_deepspeed_micro_batch
from llava_core.training.observe import TrainObserver, flops_model, peak_flops, read_metrics, train_flops
from llava_core.training.sampler import DataPosition, EpochBatches, record_info

log = logging.getLogger("llava_core.training")


class Recipe:
    """One training phase: `_setup_model`, `_setup_data`, `_setup_optimizer`, `_loss_step`, `train`."""

    def __init__(self, cfg: PipelineConfig, phase: str) -> None:
        from accelerate import Accelerator, PartialState
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.cfg, self.phase, self.tc = cfg, get_phase(phase).name, cfg.train[phase]
        self.data_dir = cfg.hdf5_dir(phase)
        self.dataset = LlavaHdf5Dataset(self.data_dir, cfg.image_root, cfg.model.image_size)
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
        set_deepspeed_micro_batch(self.accelerator, self.tc.micro_batch_size)
        set_seed(cfg.seed)
        self.checkpoints = Checkpointer(self.accelerator, cfg, phase, self.log)
        self.observer: TrainObserver | None = None
        self._early_lines: list[str] = []
        # SIGTERM (SLURM preemption, the time limit's --signal, a requeue): save at the next step boundary, then stop
        self.sigterm = False
        self.stopped_at: int | None = None
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.sigterm = True

    def _stopping(self) -> bool:
        """Whether any process got SIGTERM (all of them stop at the same step, to save one checkpoint together)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self.sigterm
        flag = torch.tensor([1.0 if self.sigterm else 0.0], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)

    def log(self, msg: str) -> None:
        if self.observer is not None:
            self.observer.log(msg)
        elif self.accelerator.is_main_process:
            log.info(f"[{self.phase}] {msg}")
            self._early_lines.append(msg)  # sent to Dagster once the observer is up

    # --- setup ------------------------------------------------------------------------------------------------
    def _setup_model(self) -> LlavaModel:
        tok = load_tokenizer(self.cfg.resolve_file(self.cfg.model.tokenizer))
        self.tokenizer = tok
        prev = get_phase(self.phase).previous
        if prev is None:
            special = {
                "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id,
            }
            model = build_model(self.cfg, len(tok), special)
        else:
            prev_dir = self.cfg.checkpoint_dir(prev)
            if not (prev_dir / TRAIN_SUMMARY).is_file():
                raise FileNotFoundError(f"{prev_dir} holds no finished {prev} checkpoint: train {prev} first")
            # model state only (optimizer state starts fresh), held in `model.dtype` as a new model is
            model = load_checkpoint(prev_dir).to(DTYPES[self.cfg.model.dtype])
        self.model_dtype = parameter_dtype(model)  # before LoRA (peft may keep its adapters in fp32)
        self.log(f"weights held in {self.model_dtype} (model.dtype), mixed precision: {self.tc.mixed_precision}")
        params = self.dataset.params
        vocab = model.text_model.get_input_embeddings().num_embeddings
        if params["vocab_size"] > vocab:
            raise ValueError(f"data vocab {params['vocab_size']} exceeds the model's embeddings {vocab}")
        if self.dataset.data.num_patches != model.num_patches:
            raise ValueError(
                f"data has {self.dataset.data.num_patches} image slots, the vision tower gives {model.num_patches} patches"
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
            self.dataset.image_start,
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
        )
        return loss

    # --- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> dict | None:
        """The phase's loop; the summary, or None when SIGTERM stopped it (a resume point is saved)."""
        acc = self.accelerator
        model = self._setup_model()
        batches = self._setup_data()
        self.steps_per_epoch = max(1, math.ceil(len(batches) / self.accum))
        total_steps = max(1, math.ceil(len(batches) * self.tc.epochs / self.accum))
        optimizer, scheduler = self._setup_optimizer(model, total_steps)
        self.flops = flops_model(model)
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        pos = DataPosition()
        self.checkpoints.register(pos)
        resume = self.checkpoints.prepare()
        if resume is not None:
            self.checkpoints.load(model, resume)
        start_step = pos.step
        self.observer = TrainObserver(
            self.checkpoints.work,
            self.phase,
            total_steps,
            start_step,
            acc.is_main_process,
            self.tc.trackers,
            self._tracked_settings(total_steps),
        )
        self.observer.replay(self._early_lines)
        if resume is not None:
            self.log(f"resumed from {resume.name}: step {pos.step}, epoch {pos.epoch}, batch {pos.offset}")
        self.log(
            f"{len(self.dataset)} examples, {total_steps} optimizer steps of {self.tc.global_batch_size} "
            f"({acc.num_processes} process(es) x {self.tc.micro_batch_size} x {self.accum} accumulation)"
        )
        device_name = torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else None
        self.peak = peak_flops(device_name, self.tc.peak_tflops)
        t0 = time.perf_counter()
        totals, last = self._run_steps(model, optimizer, scheduler, batches, pos, total_steps)
        if self.stopped_at is not None:
            self.checkpoints.save_preempted(self.stopped_at)
            return None
        acc.wait_for_everyone()
        seconds = time.perf_counter() - t0
        records = read_metrics(self.checkpoints.work / METRICS) if acc.is_main_process else []
        summary = self._summary(pos, records, seconds, totals, last, start_step if resume is not None else None)
        self.checkpoints.save_final(model, self.tokenizer, summary, records, self.observer)
        return summary

    def _run_steps(self, model, optimizer, scheduler, batches: EpochBatches, pos: DataPosition, total_steps: int):
        """Micro-batches from where `pos` stands until `total_steps` optimizer steps are done."""
        acc = self.accelerator
        totals, last = {"tokens": 0, "samples": 0}, None
        window = self._new_window()
        model.train()
        while pos.step < total_steps and self.stopped_at is None:
            for batch in self._loader(batches(pos.epoch)[pos.offset :]):
                pos.offset += 1
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                with acc.accumulate(model):
                    loss = self._loss_step(model, batch)
                    acc.backward(loss)
                    grad_norm = None
                    if acc.sync_gradients:
                        trainable = [p for p in model.parameters() if p.requires_grad]
                        grad_norm = acc.clip_grad_norm_(trainable, self.tc.max_grad_norm)
                    optimizer.step()
                    if acc.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                self._count(window, loss, batch)
                if not acc.sync_gradients:
                    continue
                pos.step += 1
                self.observer.advance()
                if pos.step % self.tc.log_every == 0 or pos.step == total_steps:
                    last = self._log_window(window, pos, scheduler, grad_norm, totals)
                    window = self._new_window()
                if self.tc.save_every and pos.step % self.tc.save_every == 0 and pos.step < total_steps:
                    t_save = time.perf_counter()
                    self.checkpoints.save_step(pos.step)
                    window["t"] += time.perf_counter() - t_save  # the window's rates measure training alone
                if pos.step >= total_steps:
                    break
                if self._stopping():
                    self.stopped_at = pos.step
                    break
            else:  # the epoch ran out (an accumulation group may go on in the next one)
                pos.epoch, pos.offset = pos.epoch + 1, 0
        return totals, last

    def _tracked_settings(self, total_steps: int) -> dict:
        """The run's settings as the trackers log them (flat, scalar values): the phase's train section, the
        seed and preset, and the step count they give."""
        flat = {"phase": self.phase, "preset": self.cfg.preset, "seed": self.cfg.seed, "total_steps": total_steps}
        for k, v in self.tc.model_dump(exclude={"trackers", "accelerate_config"}).items():
            if isinstance(v, dict):
                flat.update({f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, bool | int | float | str)})
            elif isinstance(v, list):
                flat[k] = ",".join(map(str, v))
            elif isinstance(v, bool | int | float | str):
                flat[k] = v
        return flat

    def _summary(self, pos, records, seconds, totals, last, resumed_from) -> dict:
        return {
            "phase": self.phase,
            "steps": pos.step,
            "final_loss": records[-1]["loss"] if records else None,
            "first_loss": records[0]["loss"] if records else None,
            "examples": len(self.dataset),
            "global_batch_size": self.tc.global_batch_size,
            "processes": self.accelerator.num_processes,
            "seconds": seconds,
            "resumed_from_step": resumed_from,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),  # a requeue of the same job finds its work done
            "tokens_per_s": totals["tokens"] / seconds,
            "samples_per_s": totals["samples"] / seconds,
            "mfu": last.get("mfu") if last else None,
            "trainable_parameters": self.freeze.trainable,
            "total_parameters": self.freeze.trainable + self.freeze.frozen,
            "image_patch_start_idx": self.dataset.image_start,
            "model_dtype": self.model_dtype,  # what the weights were held in (model.dtype)
            "lora": self.tc.lora.model_dump() if self.tc.lora else None,
            **self._device_info(),
        }

    def _device_info(self) -> dict:
        """Where the run ran: device kind and count, world size, machines, precision, torch and CUDA versions."""
        acc = self.accelerator
        cuda = acc.device.type == "cuda"
        local = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        return {
            "device_kind": acc.device.type,
            "device_count": acc.num_processes if cuda else 0,  # one GPU per process, over all machines
            "device_name": torch.cuda.get_device_name(acc.device) if cuda else None,
            "world_size": acc.num_processes,
            "machines": max(1, acc.num_processes // max(1, local)),
            "distributed_type": acc.distributed_type.value,
            "mixed_precision": acc.mixed_precision,
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda,
        }

    # --- what a logged window records -------------------------------------------------------------------------
    @staticmethod
    def _new_window() -> dict:
        return {"loss": 0.0, "n": 0, "tokens": 0, "samples": 0, "images": 0, "length": 0, "t": time.perf_counter()}

    @staticmethod
    def _count(window: dict, loss: torch.Tensor, batch: dict) -> None:
        window["loss"] += loss.detach().float().item()
        window["n"] += 1
        window["tokens"] += int(batch["attention_mask"].sum())
        window["samples"] += batch["input_ids"].shape[0]
        window["images"] += int(batch["has_image"].sum())
        window["length"] += batch["input_ids"].shape[1]

    def _log_window(self, window, pos, scheduler, grad_norm, totals) -> dict:
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
            "epoch": pos.step / self.steps_per_epoch,
        }
        if self.peak:
            seq_len = g[4] / (window["n"] * acc.num_processes)
            flops = train_flops(self.flops, int(tokens), int(images), int(seq_len))
            rec["mfu"] = flops / dt / (self.peak * acc.num_processes)
        self.observer.record(rec)
        self.log(
            f"step {rec['step']} loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s"
            + (f" mfu {rec['mfu']:.3f}" if "mfu" in rec else "")
        )
        return rec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="One LLaVA training phase (run me under `accelerate launch`).")
    ap.add_argument("--config-json", required=True, help="resolved pipeline config written by the stage")
    ap.add_argument("--phase", required=True, choices=PHASE_NAMES)
    args = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LLAVA_LOG_LEVEL", "INFO"), format="%(message)s", force=True)
    raw = json.loads(Path(args.config_json).read_text())
    base = Path(raw.pop("base_dir"))
    recipe = Recipe(config_from_dict(raw, base), args.phase)
    try:
        summary = recipe.train()
    except BaseException as e:
        if recipe.observer is not None:
            recipe.observer.fail(e)
        raise
    if summary is None:  # stopped by SIGTERM after saving (the marker says so): the Dagster Pipes session stays open
        recipe.observer.suspend()  # for the requeued job, and the process ends normally


if __name__ == "__main__":
    main()
