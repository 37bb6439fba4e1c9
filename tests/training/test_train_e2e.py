"""Training under `accelerate launch`: SIGKILL and resume gives the uninterrupted run's loss curve and weights;
two CPU processes (gloo) train phase 2 with LoRA, grouped batches and gradient checkpointing, and checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llava_core import pipeline
from llava_core.artifacts import RESUME_KEY, TRAIN_SUMMARY
from llava_core.params import load_config
from llava_core.training.checkpointing import ResumeMismatch, find_resume, resume_key, step_checkpoints, work_dir
from llava_core.training.launch import launch_command, launch_env, train
from llava_core.training.observe import read_metrics
from llava_core.training.sampler import EpochBatches, record_info
from tests.conftest import PROJECT, e2e_params
from tests.helpers_launch import build_phases

pytestmark = pytest.mark.e2e

# 64 records, micro-batch 4, 2 micro-batches per step: 8 steps per epoch, 2 epochs
RESUMABLE = {"epochs": 2, "global_batch_size": 8, "micro_batch_size": 4, "log_every": 1, "save_every": 3}


def _params(folder: Path, data_root: Path, **phase_overrides) -> Path:
    path = e2e_params(folder, root=str(data_root))
    raw = yaml.safe_load(path.read_text())
    for phase, values in phase_overrides.items():
        raw["train"][phase].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """One workspace with the small source converted and packed for both phases."""
    root = tmp_path_factory.mktemp("train_data")
    build_phases(load_config(_params(root, root)))
    return root


def _workspace(tmp_path: Path, data_root: Path, name: str, **overrides) -> Path:
    """A params file whose data comes from `data_root` and whose checkpoints go to its own folder."""
    params = _params(tmp_path / name, data_root, **overrides)
    raw = yaml.safe_load(params.read_text())
    raw["workspace"]["checkpoints"] = str(tmp_path / name / "checkpoints")
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    return params


def _kill_after_checkpoint(cfg, phase: str) -> None:
    """Start the phase, SIGKILL its whole process group as soon as a resumable checkpoint exists."""
    cmd = launch_command(cfg, phase)
    proc = subprocess.Popen(cmd, env=launch_env(), start_new_session=True, stdout=subprocess.DEVNULL)
    work = work_dir(cfg, phase)
    deadline = time.monotonic() + 240
    try:
        while not step_checkpoints(work):
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_then_restart_continues_the_same_loss_curve(tmp_path, data_root):
    straight = load_config(_workspace(tmp_path, data_root, "straight", phase1=RESUMABLE))
    ref = train(straight, "phase1")
    assert ref.steps == 16
    ref_losses = [r["loss"] for r in read_metrics(ref.path / "metrics.jsonl")]
    assert [r["step"] for r in read_metrics(ref.path / "metrics.jsonl")] == list(range(1, 17))
    assert not step_checkpoints(ref.path) and not (ref.path / RESUME_KEY).exists()  # resume points removed

    params = _workspace(tmp_path, data_root, "killed", phase1=RESUMABLE)
    cfg = load_config(params)
    _kill_after_checkpoint(cfg, "phase1")
    work = work_dir(cfg, "phase1")
    assert not cfg.checkpoint_dir("phase1").exists()  # nothing finished was published
    saved = step_checkpoints(work)
    assert saved and all(int(p.name.split("-")[1]) % 3 == 0 for p in saved) and len(saved) <= 2
    killed_at = int(saved[-1].name.split("-")[1])
    assert killed_at < 16

    # a changed setting that alters the numbers refuses to resume, naming it; a logging setting does not
    changed = load_config(params, {"train": {"phase1": {"learning_rate": 5e-4}}})
    with pytest.raises(ResumeMismatch, match=r"train\.learning_rate changed"):
        find_resume(work, resume_key(changed, "phase1", 1), "auto", "phase1")
    quieter = load_config(params, {"train": {"phase1": {"log_every": 5, "save_every": 4}}})
    assert find_resume(work, resume_key(quieter, "phase1", 1), "auto", "phase1") == saved[-1]
    assert find_resume(work, resume_key(changed, "phase1", 1), "never", "phase1") is None

    resumed = train(cfg, "phase1")
    assert resumed.summary["resumed_from_step"] == killed_at
    records = read_metrics(resumed.path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 17))  # one curve: the killed run's tail was dropped
    assert [r["loss"] for r in records] == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    a, b = load_file(str(ref.path / "model.safetensors")), load_file(str(resumed.path / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    assert (resumed.path / "loss_curve.csv").read_text().splitlines()[0] == "step,loss,lr,grad_norm"


def test_two_cpu_processes_train_lora_phase2_and_checkpoint(tmp_path, data_root, capfd):
    ddp = str(PROJECT / "configs" / "accelerate" / "cpu_ddp.yaml")
    two = {
        "epochs": 1,
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "log_every": 1,
        "save_every": 2,
        "accelerate_config": ddp,
    }
    phase2 = {
        **two,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "group_by_modality_length": True,
        "gradient_checkpointing": True,
    }
    cfg = load_config(_workspace(tmp_path, data_root, "ddp", phase1=two, phase2=phase2))
    p1 = train(cfg, "phase1")
    assert p1.summary["processes"] == 2 and p1.steps == 8  # 64 records / (2 x 2 x 2)
    r = train(cfg, "phase2")
    s = r.summary
    # grouped batches never mix modalities, so the epoch may hold a partial batch more than 64 / 2
    per_rank = len(EpochBatches(record_info(cfg.hdf5_dir("phase2")), 2, cfg.seed, 2, 0, True))
    assert s["processes"] == 2 and s["steps"] == -(-per_rank // 2) and s["lora"]["r"] == 4
    err = capfd.readouterr().err  # the training process's progress: logging, on stderr
    saved = [line for line in err.splitlines() if line.startswith("[phase2] checkpoint step-")]
    assert saved == [f"[phase2] checkpoint step-{k:08d}" for k in range(2, s["steps"], 2)]
    assert "2 process(es)" in err
    # LoRA: the LM trains only through its adapters, the projector fully
    assert s["trainable_parameters"] < 100_000
    adapters = load_file(str(r.path / "adapter/adapter_model.safetensors"))
    assert adapters and all("lora_" in k for k in adapters)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # B starts at 0: it trained
    # the saved weights are merged: plain LlavaModel keys that export reads, different from phase 1's LM
    merged = load_file(str(r.path / "model.safetensors"))
    before = load_file(str(p1.path / "model.safetensors"))
    assert merged.keys() == before.keys()
    q = "text_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], before[q])
    assert torch.equal(
        merged["image_model.embeddings.patch_embedding.weight"],
        before["image_model.embeddings.patch_embedding.weight"],
    )
    assert json.loads((r.path / TRAIN_SUMMARY).read_text())["steps"] == s["steps"]
    assert s["model_dtype"] == p1.summary["model_dtype"] == "float32"  # model.dtype's default
    assert [rec["step"] for rec in read_metrics(r.path / "metrics.jsonl")] == list(range(1, s["steps"] + 1))
    assert list((r.path / "tensorboard").glob("events.out.tfevents.*"))
    hf = pipeline.run_export(cfg)  # the merged checkpoint exports like any other
    assert Path(hf["path"], "config.json").is_file()
