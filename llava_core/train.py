"""Stage 4, training: one phase of the LLaVA recipe as an explicit accelerate loop, in its own process.

`train(cfg, phase)` is the stage function: it writes the resolved config next to the run and starts
`accelerate launch -m llava_core.train` with the phase's accelerate config. The launched process runs
`Recipe` (setup model, optimizer, data; loss step; train) and writes the finished checkpoint into a
temporary folder that is renamed to `checkpoints/<phase>/` only when complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from llava_core.config import PipelineConfig, config_from_dict, partial_dir, replace_dir, write_json_atomic
from llava_core.hdf5 import LlavaHdf5Dataset, collate_trimmed
from llava_core.model import LlavaModel, apply_freeze, build_model, load_model, save_model
from llava_core.tokenizer import load_tokenizer

SUMMARY = "train_summary.json"
METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    phase: str
    path: Path
    steps: int
    final_loss: float
    summary: dict


def previous_phase(phase: str) -> str | None:
    return {"phase1": None, "phase2": "phase1"}[phase]


class Recipe:
    """One training phase: `_setup_model`, `_setup_data`, `_setup_optimizer`, `_loss_step`, `train`."""

    def __init__(self, cfg: PipelineConfig, phase: str) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.phase, self.tc = cfg, phase, cfg.train[phase]
        self.data_dir = cfg.hdf5_dir(phase)
        self.data_params = json.loads((self.data_dir / "data_params.json").read_text())
        accum = self.tc.global_batch_size // self.tc.micro_batch_size
        self.accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision=self.tc.mixed_precision)
        world = self.accelerator.num_processes
        if self.tc.global_batch_size % (self.tc.micro_batch_size * world):
            raise ValueError(
                f"global_batch_size {self.tc.global_batch_size} is not divisible by micro_batch_size "
                f"{self.tc.micro_batch_size} x {world} processes"
            )
        self.accum = accum // world
        self.accelerator.gradient_accumulation_steps = self.accum
        set_seed(cfg.seed)
        self.out = cfg.checkpoint_dir(phase)
        self.work = self.out.with_name(f".{self.out.name}.partial")

    def log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            print(f"[{self.phase}] {msg}", flush=True)

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
        return model

    def _setup_data(self) -> DataLoader:
        ds = LlavaHdf5Dataset(self.data_dir, self.cfg.image_root, self.cfg.model.image_size)
        self.image_start = ds.image_start
        g = torch.Generator().manual_seed(self.cfg.seed)
        return DataLoader(
            ds,
            batch_size=self.tc.micro_batch_size,
            shuffle=True,
            generator=g,
            num_workers=self.tc.num_workers,
            drop_last=False,
            collate_fn=collate_trimmed,
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

    def train(self) -> dict:
        acc = self.accelerator
        model = self._setup_model()
        loader = self._setup_data()
        steps_per_epoch = math.ceil(len(loader) / acc.num_processes / self.accum)
        total_steps = max(1, math.ceil(steps_per_epoch * self.tc.epochs))
        optimizer, scheduler = self._setup_optimizer(model, total_steps)
        model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
        if acc.is_main_process:
            self.work = partial_dir(self.out)
        acc.wait_for_everyone()
        metrics_f = open(self.work / METRICS, "w") if acc.is_main_process else None
        self.log(f"{len(loader.dataset)} examples, {total_steps} optimizer steps of {self.tc.global_batch_size}")

        step, t0, losses = 0, time.perf_counter(), []
        window = {"loss": 0.0, "n": 0, "tokens": 0, "samples": 0, "t": time.perf_counter()}
        model.train()
        while step < total_steps:
            for batch in loader:
                with acc.accumulate(model):
                    loss = self._loss_step(model, batch)
                    acc.backward(loss)
                    grad_norm = None
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(
                            [p for p in model.parameters() if p.requires_grad], self.tc.max_grad_norm
                        )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                window["loss"] += loss.detach().float().item()
                window["n"] += 1
                window["tokens"] += int(batch["attention_mask"].sum()) * acc.num_processes
                window["samples"] += batch["input_ids"].shape[0] * acc.num_processes
                if not acc.sync_gradients:
                    continue
                step += 1
                if step % self.tc.log_every == 0 or step == total_steps:
                    dt = time.perf_counter() - window["t"]
                    rec = {
                        "step": step,
                        "loss": window["loss"] / window["n"],
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "tokens_per_s": window["tokens"] / dt,
                        "samples_per_s": window["samples"] / dt,
                        "epoch": step / steps_per_epoch,
                    }
                    losses.append(rec["loss"])
                    if metrics_f:
                        metrics_f.write(json.dumps(rec) + "\n")
                        metrics_f.flush()
                    self.log(
                        f"step {step}/{total_steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                        f"{rec['tokens_per_s']:.0f} tok/s"
                    )
                    window = {"loss": 0.0, "n": 0, "tokens": 0, "samples": 0, "t": time.perf_counter()}
                if step >= total_steps:
                    break

        acc.wait_for_everyone()
        summary = {
            "phase": self.phase,
            "steps": step,
            "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None,
            "examples": len(loader.dataset),
            "global_batch_size": self.tc.global_batch_size,
            "processes": acc.num_processes,
            "seconds": time.perf_counter() - t0,
            "trainable_parameters": self.freeze.trainable,
            "total_parameters": self.freeze.trainable + self.freeze.frozen,
            "image_patch_start_idx": self.image_start,
        }
        if acc.is_main_process:
            metrics_f.close()
            save_model(acc.unwrap_model(model), self.work)
            self.tokenizer.save_pretrained(self.work / "tokenizer")
            write_json_atomic(self.work / "run_config.json", self.cfg.stage_view("model", "train", "hdf5"))
            write_json_atomic(self.work / SUMMARY, summary)  # last: marks the checkpoint complete
            replace_dir(self.work, self.out)
        acc.wait_for_everyone()
        return summary


def train(cfg: PipelineConfig, phase: str, num_processes: int | None = None) -> TrainResult:
    """Stage function: run one phase under `accelerate launch` and return its summary."""
    if phase not in cfg.train:
        raise KeyError(f"unknown phase {phase!r}; valid: {sorted(cfg.train)}")
    tc = cfg.train[phase]
    out = cfg.checkpoint_dir(phase)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = out.parent / f".{phase}.launch.json"
    write_json_atomic(spec, cfg.to_dict())
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg.resolve_file(tc.accelerate_config)]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    cmd += ["-m", "llava_core.train", "--config-json", str(spec), "--phase", phase]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training {phase} failed (exit {proc.returncode}); command: {' '.join(cmd)}")
    summary = json.loads((out / SUMMARY).read_text())
    spec.unlink(missing_ok=True)
    return TrainResult(phase, out, summary["steps"], summary["final_loss"], summary)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="One LLaVA training phase (run me under `accelerate launch`).")
    ap.add_argument("--config-json", required=True, help="resolved pipeline config written by the stage")
    ap.add_argument("--phase", required=True, choices=["phase1", "phase2"])
    args = ap.parse_args(argv)
    raw = json.loads(Path(args.config_json).read_text())
    base = Path(raw.pop("base_dir"))
    Recipe(config_from_dict(raw, base), args.phase).train()


if __name__ == "__main__":
    main()
