"""What every benchmark shares: tiny-preset workspaces, timing, the machine, and the result rows.

A benchmark module has `run(quick) -> {"figures": [row, ...], "details": {...}}` and a `main()` that writes that
as JSON (`--json PATH`); `benchmarks/run_all.py` runs each one in its own process and tabulates the rows. A row
is one measured figure beside its baseline, measured in the same run (`figure()`).
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
CPU_ACCELERATE = str(PROJECT / "configs" / "accelerate" / "cpu.yaml")
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}


def tiny_params(root: Path, source: dict, train: dict | None = None, **sections) -> dict:
    """The project's params.yaml pointed at `root`: the synthetic source's options, train and other sections
    overridden (`train` = {phase: {...}}, `hdf5={"phase2": {...}}`), both phases on the one-CPU accelerate config."""
    import yaml

    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["workspace"]["root"] = str(root)
    params["sources"]["synthetic_shapes"]["options"].update(source)
    for phase in ("phase1", "phase2"):
        params["train"][phase]["accelerate_config"] = CPU_ACCELERATE
        params["train"][phase].update((train or {}).get(phase, {}))
    for section, phases in sections.items():
        for phase, values in phases.items():
            params[section].setdefault(phase, {}).update(values)
    return params


def write_params(path: Path, params: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def rate(n: float, seconds: float) -> float:
    return round(n / seconds, 1)


def best(fn: Callable[[], object], repeats: int) -> float:
    """The shortest of `repeats` wall times of fn() (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def figure(
    benchmark: str,
    name: str,
    unit: str,
    ours: float | None,
    baseline: float | None,
    baseline_name: str,
    target: tuple[str, str, float] | None = None,
    note: str = "",
) -> dict:
    """One row of the results table: `ratio` = ours / baseline (both measured in this run); `target` =
    (`"ratio"` or `"ours"`, operator, value), `met` its truth (None without a target or a figure)."""
    ratio = ours / baseline if ours is not None and baseline else None
    met = None
    if target is not None:
        on, op, value = target
        got = ratio if on == "ratio" else ours
        met = None if got is None else bool(OPS[op](got, value))
    return {
        "benchmark": benchmark,
        "figure": name,
        "unit": unit,
        "ours": ours,
        "baseline": baseline,
        "baseline_name": baseline_name,
        "ratio": ratio,
        "target": f"{target[0]} {target[1]} {target[2]:g}" if target else None,
        "met": met,
        "note": note,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name (nvidia-smi; no torch import), None without one."""
    import shutil

    if not shutil.which("nvidia-smi"):
        return None
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    names = proc.stdout.strip().splitlines() if proc.returncode == 0 else []
    return f"{len(names)} x {names[0]}" if names else None


def machine() -> dict:
    """What the figures were measured on (the load average says how busy the machine was)."""
    from importlib.metadata import version

    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "gpu": gpu_name(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# the workspaces a benchmark that offers sizes runs on: make bench's reduced one (first: the default), make demo's
WORKSPACES = ("reduced", "default")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class OtherWork:
    """The CPU that processes other than this run's took while it ran, as a share of the machine (0-1).

    Every process this run starts inherits `LLAVA_BENCH_RUN=<token>` in its environment, orphans and daemons
    too (a Dagster forkserver, DVC's helpers), which no wait() accounts for. A thread reads /proc every second:
    each process without the token adds the CPU time it used since it was last seen (a process born during the
    run all of its CPU time). Processes of others that live less than a second are missed; None off Linux."""

    VAR = "LLAVA_BENCH_RUN"

    def __init__(self, interval: float = 1.0) -> None:
        self.token = uuid.uuid4().hex
        self.interval = interval
        self.seen: dict[tuple[int, int], float] = {}  # (pid, start tick) -> CPU seconds when last read
        self.others = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="other-work", daemon=True)
        self.available = Path("/proc/self/stat").is_file()

    def __enter__(self) -> OtherWork:
        os.environ[self.VAR] = self.token
        self._t0 = time.perf_counter()
        if self.available:
            self._start_ticks = self._uptime_ticks()
            self._read(first=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self.available:
            self._stop.set()
            self._thread.join()
            self._read()
        os.environ.pop(self.VAR, None)

    def share(self, cores: int | None) -> float | None:
        if not self.available or not cores or self.seconds <= 0:
            return None
        return round(min(1.0, self.others / (self.seconds * cores)), 3)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    @staticmethod
    def _uptime_ticks() -> float:
        return float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK")

    def _read(self, first: bool = False) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        marker = f"{self.VAR}={self.token}".encode()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                cpu, started = (int(fields[11]) + int(fields[12])) / tick, int(fields[19])
                key = (int(entry.name), started)
                if key not in self.seen:
                    # this process's own environ is as it started: it is ours by its pid
                    ours = key[0] == os.getpid() or marker in Path(entry.path, "environ").read_bytes()
                    if ours:
                        self.seen[key] = -1.0
                        continue
                    # already running when we started: count from now; born since: all of it
                    before = cpu if first or started < self._start_ticks else 0.0
                    self.seen[key] = before
                if self.seen[key] < 0:  # one of ours
                    continue
                self.others += cpu - self.seen[key]
                self.seen[key] = cpu
            except (OSError, IndexError, ValueError):  # gone meanwhile, or a kernel thread without environ
                continue


def venv_env(**extra: str) -> dict[str, str]:
    """The environment with this interpreter's scripts (llava-pipeline, dvc, accelerate) first on PATH."""
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), **extra}


def timed_process(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run a command to the end: wall seconds, exit status and output (stdout and stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=cwd, env=env or venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return {"seconds": time.perf_counter() - t0, "returncode": proc.returncode, "output": proc.stdout}


def check(result: dict, what: str) -> dict:
    if result["returncode"] != 0:
        raise RuntimeError(f"{what} failed (exit {result['returncode']}):\n{result['output'][-3000:]}")
    return result


def bench_main(run: Callable[..., dict], doc: str, workspace: tuple[str, ...] = ()) -> None:
    """The command line of one benchmark: `--quick`, `--json PATH` (what the harness reads), and `--workspace`
    (its first choice the default) where the benchmark offers sizes; prints the rows."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repetition (checks the benchmark runs)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures and details there")
    if workspace:
        ap.add_argument("--workspace", choices=workspace, default=workspace[0], help="the workspace's size")
    args = ap.parse_args()
    if workspace and args.quick and args.workspace != workspace[0]:
        ap.error("--quick has its own sizes: give --quick or --workspace, not both")
    result = run(quick=args.quick, **({"workspace": args.workspace} if workspace else {}))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    for row in result["figures"]:
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
        print(f"{row['benchmark']:13s} {row['figure'][:60]:60s} {row['ours']!s:>12.12s} {ratio:>8s} {row['met']}")
