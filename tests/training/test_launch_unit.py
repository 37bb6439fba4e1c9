"""The launch checks without training: accelerate configs read as plain YAML, the GPUs nvidia-smi lists, the refusal
of what cannot run, the parameter counts against the models transformers builds, the memory plan of the published
LLaVA-1.5 settings, the `plan` command, the SLURM settings and their job script."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_core.config import ConfigError
from llava_core.params import load_config
from llava_core.presets import CLIP_VIT_L_336, LLAMA2_7B, LLAMA2_13B, LLAMA_1B
from llava_core.training.devices import (
    Gpu,
    LaunchRefused,
    check_devices,
    parse_nvidia_smi,
    read_launch_config,
    visible_gpus,
)
from llava_core.training.memory import GIB, Architecture, architecture, check_fits, count_trainable, plan_for
from llava_core.training.slurm import job_script
from tests.helpers_unit import PROJECT, base_params, write_params

ACCELERATE = PROJECT / "configs" / "accelerate"
A100_80 = [Gpu(i, "NVIDIA A100-SXM4-80GB", 80 * GIB) for i in range(8)]


def _llava_params(tmp_path: Path, size: str, **train) -> Path:
    """A 7B/13B preset params file (its own accelerate configs unless `train` names others)."""
    params = base_params(tmp_path)
    params["preset"] = f"llava-v1.5-{size}"
    params["train"] = {p: dict(train.get(p, {})) for p in ("phase1", "phase2")}
    params.pop("model", None)
    return write_params(tmp_path, params)


# --- accelerate configs and devices -------------------------------------------------------------------------------
def test_launch_configs_say_what_they_need():
    cpu, ddp, gpu = (read_launch_config(ACCELERATE / n) for n in ("cpu.yaml", "cpu_ddp.yaml", "multi_gpu.yaml"))
    assert not cpu.uses_gpus and not ddp.uses_gpus and gpu.uses_gpus  # cpu_ddp is MULTI_GPU with use_cpu
    assert read_launch_config(ACCELERATE / "single_gpu.yaml").uses_gpus  # distributed NO, gpu_ids "0"
    zero3, fsdp = read_launch_config(ACCELERATE / "deepspeed_zero3.yaml"), read_launch_config(ACCELERATE / "fsdp.yaml")
    assert (zero3.engine, fsdp.engine, gpu.engine, cpu.engine) == (
        "deepspeed-zero3",
        "fsdp-full-shard",
        "ddp",
        "single",
    )
    multi = read_launch_config(ACCELERATE / "cpu_multi_node.yaml")
    assert (multi.num_machines, multi.processes_per_machine, multi.main_process_ip) == (2, 1, "127.0.0.1")
    assert read_launch_config(ACCELERATE / "multi_node.yaml").processes_per_machine == 8


def test_unknown_distributed_type_is_refused(tmp_path):
    bad = tmp_path / "tpu.yaml"
    bad.write_text("distributed_type: XLA\nnum_processes: 8\n")
    with pytest.raises(LaunchRefused, match=r"tpu\.yaml: distributed_type 'XLA'; valid: NO, MULTI_CPU, MULTI_GPU"):
        read_launch_config(bad)


def test_gpu_configs_are_refused_without_gpus_or_cuda_or_enough_gpus():
    multi = read_launch_config(ACCELERATE / "multi_gpu.yaml")
    with pytest.raises(LaunchRefused, match=r"multi_gpu\.yaml \(MULTI_GPU, 8 process\(es\)\) needs CUDA GPUs.*none"):
        check_devices(multi, [], "cuda")
    with pytest.raises(LaunchRefused, match=r"multi_gpu\.yaml.*installed torch is the CPU build.*ACCEL=cuda"):
        check_devices(multi, A100_80, "cpu")
    with pytest.raises(LaunchRefused, match=r"multi_gpu\.yaml.*starts 8 process\(es\) on this machine, which has 4"):
        check_devices(multi, A100_80[:4], "cuda")
    check_devices(multi, A100_80, "cuda")  # fits
    check_devices(multi.with_processes(16, 2), A100_80, "cuda")  # 8 per machine on 2 machines
    check_devices(read_launch_config(ACCELERATE / "cpu_ddp.yaml"), [], "cpu")  # CPU processes need no GPU


def test_nvidia_smi_lists_the_visible_gpus(tmp_path):
    """The driver's listing as `visible_gpus` reads it: a stand-in `nvidia-smi` prints what the real one prints."""
    listing = "0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 81559\n2, NVIDIA H100 80GB HBM3, 81559\n"
    assert parse_nvidia_smi(listing + "garbage line\n")[2] == Gpu(2, "NVIDIA H100 80GB HBM3", 81559 * 2**20)
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '{listing}'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    assert [g.index for g in visible_gpus(env)] == [0, 1, 2]
    assert [g.index for g in visible_gpus({**env, "CUDA_VISIBLE_DEVICES": "2,0"})] == [2, 0]
    assert visible_gpus({"PATH": str(tmp_path / "nothing")}) == []


# --- parameter counts -----------------------------------------------------------------------------------------------
def _meta_model(vision: dict, text: dict):
    from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

    from llava_core.model.llava import LlavaModel

    with torch.device("meta"):
        return LlavaModel(
            CLIPVisionModel(CLIPVisionConfig(**vision)), AutoModelForCausalLM.from_config(LlamaConfig(**text))
        )


@pytest.mark.parametrize("text", [LLAMA2_7B, LLAMA2_13B, LLAMA_1B], ids=["7b", "13b", "1b"])
def test_parameter_inventory_is_the_model_transformers_builds(text):
    arch = Architecture(CLIP_VIT_L_336, text)
    model = _meta_model(CLIP_VIT_L_336, text)  # no weights allocated
    assert arch.inventory() == [(n, p.numel()) for n, p in model.named_parameters()]


def test_tiny_preset_counts_and_lora_match_the_built_model(tmp_path):
    from llava_core.data.tokenizer import load_tokenizer
    from llava_core.model.llava import apply_freeze, apply_lora, build_model

    cfg = load_config(write_params(tmp_path, base_params(tmp_path)), {"train": {"phase2": {"lora": {"r": 4}}}})
    arch = architecture(cfg)
    tok = load_tokenizer(cfg.resolve_file(cfg.model.tokenizer))
    assert arch.vocab == len(tok)  # read from tokenizer.json, as build_model sizes the embeddings
    model = build_model(cfg, len(tok), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    assert arch.inventory() == [(n, p.numel()) for n, p in model.named_parameters()]
    report = apply_freeze(model, cfg.train["phase1"].freeze)
    assert count_trainable(arch, cfg.train["phase1"].freeze) == (report.trainable + report.frozen, report.trainable)
    apply_freeze(model, cfg.train["phase2"].freeze)
    lc = cfg.train["phase2"].lora
    report = apply_lora(model, lc.r, lc.alpha, lc.dropout, lc.target_modules)
    assert count_trainable(arch, cfg.train["phase2"].freeze, lc) == (report.trainable + report.frozen, report.trainable)


# --- the memory plan -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["7b", "13b"])
def test_published_phase2_fits_8x80gb_under_zero3_and_not_under_ddp(tmp_path, size):
    """LLaVA-1.5 trains phase 2 with ZeRO-3 and gradient checkpointing on 8 A100s (the presets' settings now);
    under DDP every GPU holds the whole fp32 state: 16 bytes per trainable parameter, more than 80 GB."""
    cfg = load_config(_llava_params(tmp_path, size))
    plan = plan_for(cfg, "phase2")
    assert (plan.engine, plan.processes, plan.gradient_checkpointing) == ("deepspeed-zero3", 8, True)
    assert plan.fits(80 * GIB)
    check_fits(plan, A100_80, read_launch_config(ACCELERATE / "deepspeed_zero3.yaml"))
    n = plan.total_parameters
    assert plan.optimizer == int(plan.trainable_parameters * 12 / 8)  # fp32 master + m + v, sharded 8 ways
    assert 2 * n / 8 < plan.parameters < 2 * n / 8 + 2 * GIB  # bf16 shards + two gathered layers
    assert plan.activations_without_checkpointing > 3 * plan.activations_with_checkpointing
    ddp_cfg = load_config(
        _llava_params(tmp_path, size, phase2={"accelerate_config": str(ACCELERATE / "multi_gpu.yaml")})
    )
    ddp = plan_for(ddp_cfg, "phase2")
    assert ddp.parameters == 4 * n and ddp.optimizer == 8 * ddp.trainable_parameters
    with pytest.raises(LaunchRefused, match=r"multi_gpu\.yaml: phase2 needs about [\d.]+ GiB per GPU") as refused:
        check_fits(ddp, A100_80, read_launch_config(ACCELERATE / "multi_gpu.yaml"))
    assert "does NOT fit" in str(refused.value) and "optimizer states" in str(refused.value)  # the plan comes along


def test_plan_command_prints_the_plan_and_its_verdict(tmp_path, venv_env):
    params = _llava_params(tmp_path, "7b")
    exe = [str(Path(sys.executable).parent / "llava-pipeline"), "--params", str(params), "plan"]
    out = subprocess.run([*exe, "phase2", "--gpus", "8", "--gpu-memory-gib", "80"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "deepspeed-zero3 over 8 process(es)" in out.stdout and "optimizer states" in out.stdout
    assert "GPUs: 8 x a 80 GiB GPU (80.0 GiB): fits" in out.stdout
    small = subprocess.run([*exe, "phase2", "--gpus", "8", "--gpu-memory-gib", "24"], capture_output=True, text=True)
    assert "does NOT fit" in small.stdout
    as_json = json.loads(subprocess.run([*exe, "phase1", "--json"], capture_output=True, text=True).stdout)
    assert as_json["engine"] == "deepspeed-zero2" and as_json["total"] > as_json["parameters"] > 0
    bad = subprocess.run([*exe, "phase3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown phase 'phase3'; valid: phase1, phase2" in bad.stderr


# --- SLURM settings ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "slurm, message",
    [
        ({"time_limit": "soon"}, r"train\.phase1\.slurm: .*time_limit 'soon' is no SLURM time"),
        ({"extra_args": ["qos=high"]}, r"train\.phase1\.slurm: .*extra_args \['qos=high'\]: each entry is one sbatch"),
        ({"nodes": 0}, r"train\.phase1\.slurm\.nodes: Input should be greater than 0"),
        ({"gpu": 8}, r"train\.phase1\.slurm: unknown key 'gpu'"),
    ],
)
def test_bad_slurm_settings_are_errors(tmp_path, slurm, message):
    params = write_params(tmp_path, base_params(tmp_path))
    with pytest.raises(ConfigError, match=message):
        load_config(params, {"train": {"phase1": {"launcher": "slurm", "slurm": slurm}}})


def test_slurm_gpus_set_the_process_count_the_batch_must_divide(tmp_path):
    params = write_params(tmp_path, base_params(tmp_path))
    job = {"launcher": "slurm", "slurm": {"nodes": 2, "gpus_per_node": 4}, "global_batch_size": 32}
    with pytest.raises(
        ConfigError, match=r"global_batch_size 32 is not divisible by micro_batch_size 32 x 8 processes"
    ):
        load_config(params, {"train": {"phase1": job}})
    cfg = load_config(params, {"train": {"phase1": {**job, "micro_batch_size": 4}}})
    assert cfg.train["phase1"].processes(1) == 8 and cfg.train["phase2"].processes(1) == 1
    plan = plan_for(cfg, "phase1")  # planned as the job runs it
    assert (plan.processes, plan.machines) == (8, 2)


def test_job_script_asks_sbatch_for_the_settings(tmp_path):
    sc = {"partition": "gpu", "nodes": 2, "gpus_per_node": 8, "cpus_per_task": 64, "time_limit": "2-00:00:00",
          "account": "vision", "signal_grace_s": 300, "extra_args": ["--qos=high"], "setup": ["module load cuda"]}  # fmt: skip
    params = write_params(tmp_path, base_params(tmp_path))
    cfg = load_config(params, {"train": {"phase2": {"launcher": "slurm", "slurm": sc, "micro_batch_size": 2}}})
    text = job_script(cfg, "phase2", tmp_path / "spec.json", tmp_path / "phase2-%j.out")
    directives = [line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert directives == [
        "--job-name=llava-phase2", "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/phase2-%j.out",
        "--open-mode=append", "--signal=TERM@300", "--requeue", "--partition=gpu", "--gpus-per-node=8",
        "--cpus-per-task=64", "--time=2-00:00:00", "--account=vision", "--qos=high",
    ]  # fmt: skip
    lines = text.splitlines()
    assert lines.index("module load cuda") < next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert f"-m llava_core.training.launch --config-json {tmp_path}/spec.json --phase phase2" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    no_requeue = load_config(params, {"train": {"phase2": {"launcher": "slurm", "slurm": {"requeue": False}}}})
    text = job_script(no_requeue, "phase2", tmp_path / "spec.json", tmp_path / "log")
    assert "#SBATCH --no-requeue" in text and "scontrol requeue" not in text


def test_a_job_requeued_after_its_training_finished_does_not_train_again(tmp_path, monkeypatch, capsys):
    """A preemption (or the time limit's signal) that comes after the last step requeues a job whose checkpoint is
    complete: the requeued job finds its own job id in the checkpoint's run_stats and ends at once."""
    from llava_core.training.launch import node_main, write_spec

    params = write_params(tmp_path, base_params(tmp_path))
    job = {"launcher": "slurm", "accelerate_config": str(ACCELERATE / "single_gpu.yaml"), "slurm": {"gpus_per_node": 1}}
    cfg = load_config(params, {"train": {"phase1": job}})
    out = cfg.checkpoint_dir("phase1")
    out.mkdir(parents=True)
    (out / "train_summary.json").write_text(json.dumps({"steps": 8}))
    (out / "run_stats.json").write_text(json.dumps({"slurm_job_id": "42", "resumed_from_step": None}))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = ["--config-json", str(write_spec(cfg, "phase1")), "--phase", "phase1", "--main-process-ip", "127.0.0.1"]
    monkeypatch.setattr("signal.signal", lambda *a: None)  # node_main ignores SIGTERM: not in the test's process
    for job, restarts, status in (("42", "1", 0), ("42", "0", 2), ("43", "1", 2)):
        monkeypatch.setenv("SLURM_JOB_ID", job)
        monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
        assert node_main(argv) == status, (job, restarts)
        err = capsys.readouterr()
        if status == 0:
            assert "[slurm] phase1 finished before job 42 was requeued: nothing to train again" in err.out
        else:  # it went on to launch: here the preflight refuses the GPU the job asks for
            assert "error:" in err.err and "single_gpu.yaml" in err.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
