"""What a launch asks of the machine: its accelerate config read as plain YAML, the visible GPUs, and the refusal of
a launch that cannot run here (GPUs named on a machine without CUDA, more processes than GPUs, too little memory).

No torch import: the launcher decides before the training process starts. The GPUs come from `nvidia-smi` (the
driver), whether torch can use them from the installed torch build's version (`+cpu` builds cannot).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

# The accelerate `distributed_type`s this project launches (docs/gpus-and-clusters.md); others are refused.
GPU_TYPES = ("MULTI_GPU", "FSDP", "DEEPSPEED")
CPU_TYPES = ("NO", "MULTI_CPU")
DISTRIBUTED_TYPES = CPU_TYPES + GPU_TYPES


class LaunchRefused(RuntimeError):
    """A launch that cannot run on this machine; the message names the accelerate config and what is missing."""


@dataclass(frozen=True)
class LaunchConfig:
    """The fields of an accelerate config file that decide where and how wide a run is."""

    path: str
    distributed_type: str = "NO"
    use_cpu: bool = False
    num_processes: int = 1  # over all machines, as accelerate counts them
    num_machines: int = 1
    machine_rank: int = 0
    gpu_ids: str | None = None
    mixed_precision: str = "no"
    main_process_ip: str | None = None
    main_process_port: int | None = None
    rdzv_backend: str = "static"
    zero_stage: int | None = None  # DeepSpeed
    fsdp_sharding: str | None = None  # FSDP: FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def uses_gpus(self) -> bool:
        """Whether the config asks for CUDA devices: a GPU distributed type, or GPU ids, without `use_cpu`."""
        if self.use_cpu:
            return False
        return self.distributed_type in GPU_TYPES or self.gpu_ids not in (None, "")

    @property
    def processes_per_machine(self) -> int:
        return max(1, self.num_processes // max(1, self.num_machines))

    @property
    def engine(self) -> str:
        """How the state is held: ddp, deepspeed-zero<stage>, fsdp-<strategy> or single."""
        if self.distributed_type == "DEEPSPEED":
            return f"deepspeed-zero{self.zero_stage or 0}"
        if self.distributed_type == "FSDP":
            return f"fsdp-{(self.fsdp_sharding or 'FULL_SHARD').lower().replace('_', '-')}"
        if self.distributed_type in ("MULTI_GPU", "MULTI_CPU") and self.num_processes > 1:
            return "ddp"
        return "single"

    def with_processes(self, num_processes: int | None, num_machines: int | None = None) -> LaunchConfig:
        """The same config launched with other counts (`--num_processes`, `--num_machines`)."""
        from dataclasses import replace

        return replace(
            self,
            num_processes=num_processes if num_processes is not None else self.num_processes,
            num_machines=num_machines if num_machines is not None else self.num_machines,
        )


def _fsdp_strategy(value: Any) -> str | None:
    """accelerate writes the strategy as a name (FULL_SHARD) or, in older configs, as its number (1-5)."""
    if value is None:
        return None
    names = {1: "FULL_SHARD", 2: "SHARD_GRAD_OP", 3: "NO_SHARD", 4: "HYBRID_SHARD", 5: "HYBRID_SHARD_ZERO2"}
    if isinstance(value, int) or str(value).isdigit():
        return names.get(int(value), str(value))
    return str(value).upper()


def read_launch_config(path: str | Path) -> LaunchConfig:
    """An accelerate config file's launch fields; a missing file, bad YAML or unknown distributed_type is an error."""
    p = Path(path)
    if not p.is_file():
        raise LaunchRefused(f"accelerate config {p} not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise LaunchRefused(f"accelerate config {p} is not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise LaunchRefused(f"accelerate config {p}: expected a mapping of accelerate settings")
    kind = str(raw.get("distributed_type", "NO"))
    if kind not in DISTRIBUTED_TYPES:
        raise LaunchRefused(f"accelerate config {p}: distributed_type {kind!r}; valid: {', '.join(DISTRIBUTED_TYPES)}")
    ds, fsdp = raw.get("deepspeed_config") or {}, raw.get("fsdp_config") or {}
    gpu_ids = raw.get("gpu_ids")
    return LaunchConfig(
        path=str(p),
        distributed_type=kind,
        use_cpu=bool(raw.get("use_cpu", False)),
        num_processes=int(raw.get("num_processes", 1) or 1),
        num_machines=int(raw.get("num_machines", 1) or 1),
        machine_rank=int(raw.get("machine_rank", 0) or 0),
        gpu_ids=None if gpu_ids is None else str(gpu_ids),
        mixed_precision=str(raw.get("mixed_precision", "no")),
        main_process_ip=raw.get("main_process_ip"),
        main_process_port=raw.get("main_process_port"),
        rdzv_backend=str(raw.get("rdzv_backend", "static")),
        zero_stage=int(ds["zero_stage"]) if "zero_stage" in ds else None,
        fsdp_sharding=_fsdp_strategy(fsdp.get("fsdp_sharding_strategy")) if kind == "FSDP" else None,
        raw=raw,
    )


# --- the machine ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_bytes: int


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits` lines (memory in MiB)."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        try:
            gpus.append(Gpu(int(parts[0]), parts[1], int(float(parts[2])) * 2**20))
        except ValueError:
            continue
    return gpus


def visible_gpus(env: dict[str, str] | None = None) -> list[Gpu]:
    """The GPUs the driver lists, narrowed to CUDA_VISIBLE_DEVICES (indices) when it is set; none without a driver."""
    env = os.environ if env is None else env
    if shutil.which("nvidia-smi", path=env.get("PATH")) is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(env),
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = parse_nvidia_smi(out.stdout) if out.returncode == 0 else []
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [int(v) for v in visible.split(",") if v.strip().isdigit()]
        by_index = {g.index: g for g in gpus}
        gpus = [by_index[i] for i in wanted if i in by_index]
    return gpus


def torch_build() -> str | None:
    """`cpu` for torch's CPU build (`+cpu` version), `cuda` otherwise, None without torch (read from the metadata)."""
    try:
        v = version("torch")
    except PackageNotFoundError:
        return None
    return "cpu" if "+cpu" in v else "cuda"


# --- the decision -----------------------------------------------------------------------------------------------
def check_devices(launch: LaunchConfig, gpus: list[Gpu], build: str | None) -> None:
    """Refuse a config that names GPUs where there are none (or torch cannot use them), or wants more processes
    on this machine than it has GPUs."""
    if not launch.uses_gpus:
        return
    what = f"accelerate config {launch.path} ({launch.distributed_type}, {launch.num_processes} process(es))"
    if not gpus:
        raise LaunchRefused(
            f"{what} needs CUDA GPUs, and this machine has none (nvidia-smi lists no GPU). Use "
            "configs/accelerate/cpu.yaml or cpu_ddp.yaml here, or run on a GPU machine (docs/gpus-and-clusters.md)."
        )
    if build == "cpu":
        raise LaunchRefused(
            f"{what} needs CUDA, and the installed torch is the CPU build: `make setup ACCEL=cuda` (docs/install.md)."
        )
    wanted = launch.processes_per_machine
    usable = len(gpus)
    if launch.gpu_ids not in (None, "", "all"):
        usable = min(usable, len([g for g in str(launch.gpu_ids).split(",") if g.strip()]))
    if wanted > usable:
        raise LaunchRefused(
            f"{what} starts {wanted} process(es) on this machine, which has {usable} usable GPU(s) "
            f"({', '.join(g.name for g in gpus)}): lower num_processes (--num-processes) or use more machines."
        )


def set_deepspeed_micro_batch(accelerator, micro_batch: int) -> None:
    """DeepSpeed needs its micro-batch before `prepare`, which it reads from a prepared data loader: the training
    loop feeds its own batches (no loader is prepared), so it is set here, as accelerate's error message asks."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
