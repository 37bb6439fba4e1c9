"""Growth benchmark: the data stages and the training loader at 10k, 100k and 1M records per phase.

    python -m benchmarks.bench_scale [--quick] [--max-size N] [--json PATH] [--out DIR]
    make bench-scale        # = python -m benchmarks --only scale (about 30 min on 2 cores)

Each size gets generated sources (`benchmarks/scale_data.py`: LLaVA-Pretrain-like captions and mix665k-like
conversations over a pool of real JPEG files) and then, each stage in its own process (`scale_stage.py`, its
code imported before the clock starts): convert (both datasets, with the image checks), HDF5 phase 1 and 2 (two
writer processes), validate phase 1 and 2, and the training loader on phase 2 (record_info over every row, the
sampler's epoch, then a fixed number of batches with images). The image checks' cache is emptied before each
size, so every size decodes the pool once. A first size of `FLOOR` records measures what each stage costs
whatever the size (start of worker processes, tokenizer load): records/s "net" leaves it out.

Per size and stage: seconds, records, records/s (and net), the peak resident memory of the stage's process tree
(the sum over the process and its descendants, sampled every 0.2 s, or the process's own peak if larger) and the
bytes it wrote. Figures for the harness: each stage's net records/s at the largest size against the smallest
(target >= 0.8: no worse than linear) and its peak memory at the largest size against the size before (target
<= 1.5: bounded by shard size and worker count, not by the data). Writes `scale.json`, `scale.md` and `scale.png`
(`scale_quick.*` with --quick) into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import OtherWork, figure, machine, tiny_params, venv_env, write_params

SIZES = (10_000, 100_000, 1_000_000)
FLOOR = 200
QUICK_SIZES = (FLOOR, 400)  # --quick: the floor run is its first size (each size costs a process per stage)
STAGES = (
    ("convert", "scale_pretrain"),
    ("convert", "scale_instruct"),
    ("hdf5", "phase1"),
    ("hdf5", "phase2"),
    ("validate", "phase1"),
    ("validate", "phase2"),
    ("loader", "phase2"),
)
RESULTS = Path(__file__).resolve().parent / "results"
B = "scale"


class TreeMemory:
    """The largest sum of resident memory over a process and its descendants, sampled every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peak_kib = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def _tree(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                for task in os.listdir(f"/proc/{p}/task"):
                    todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
            except OSError:
                continue
        return out

    @staticmethod
    def _rss_kib(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kib = max(self.peak_kib, sum(self._rss_kib(p) for p in self._tree(self.pid)))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 1024


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _outputs(cfg, stage: str, key: str) -> Path | None:
    return {"convert": lambda: cfg.jsonl_path(key), "hdf5": lambda: cfg.hdf5_dir(key),
            "validate": lambda: cfg.validation_path(key)}.get(stage, lambda: None)()  # fmt: skip


def run_stage(stage: str, params: Path, key: str, tmp: Path, library: Path | None = None) -> dict:
    """One stage in its own process (on `library`'s llava_core when given): its result, wall seconds and the peak
    memory of its process tree."""
    out = tmp / f"{stage}_{key}.json"
    cmd = [sys.executable, str(Path(__file__).with_name("scale_stage.py")), stage, str(params), key, str(out)]
    env = venv_env(**({"PYTHONPATH": str(library)} if library else {}))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = TreeMemory(proc.pid)
    output, _ = proc.communicate()
    tree_mib = memory.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} {key} failed (exit {proc.returncode}):\n{output[-3000:]}")
    r = json.loads(out.read_text())
    r["wall_seconds"] = time.perf_counter() - t0
    r["peak_mib"] = round(max(tree_mib, r.pop("peak_self_mib")), 1)
    return r


def params_for(root: Path) -> Path:
    """The tiny preset over the generated source: both datasets, two writer processes, grouped batches."""
    params = tiny_params(root, {}, train={"phase2": {"group_by_modality_length": True}},
                         hdf5={"phase1": {"num_workers": 2}, "phase2": {"num_workers": 2}})  # fmt: skip
    params["sources"] = {"scale": {"kind": "local", "location": str(root / "origin")}}
    params["datasets"] = {
        "scale_pretrain": {"source": "scale", "file": "pretrain.json", "converter": "llava_json", "phase": "phase1"},
        "scale_instruct": {"source": "scale", "file": "instruct.json", "converter": "llava_json", "phase": "phase2"},
    }
    return write_params(root / "params.yaml", params)


def measure_size(n: int, root: Path, params: Path, library: Path | None = None) -> dict:
    """Sources of `n` records, then every stage; the big outputs are removed afterwards (disk)."""
    from benchmarks.scale_data import write_sources
    from llava_core.data.image_cache import cache_folder
    from llava_core.params import load_config
    from llava_core.presets import TINY_TOKENIZER

    cfg = load_config(params)
    for path in (cfg.path("jsonl"), cfg.path("hdf5"), cache_folder(cfg.image_root)):
        shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    write_sources(cfg.raw_dir("scale"), n, TINY_TOKENIZER / "tokenizer.json")
    out = {"records": n, "generate_seconds": round(time.perf_counter() - t0, 1), "stages": {}}
    for stage, key in STAGES:
        print(f"  {n:>9,} {stage} {key}", flush=True)
        r = run_stage(stage, params, key, root, library)
        path = _outputs(cfg, stage, key)
        r["output_bytes"] = _bytes(path) if path is not None else 0
        out["stages"][f"{stage} {key}"] = r
    out["disk_bytes"] = {"sources": _bytes(cfg.raw_dir("scale")), "jsonl": _bytes(cfg.path("jsonl")),
                         "hdf5": _bytes(cfg.path("hdf5"))}  # fmt: skip
    for path in (cfg.path("jsonl"), cfg.path("hdf5"), cfg.raw_dir("scale") / "pretrain.json",
                 cfg.raw_dir("scale") / "instruct.json"):  # fmt: skip
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return out


def table(sizes: list[dict], floor: dict) -> list[dict]:
    """A row per stage and size: seconds, records, records/s, net records/s (beyond the floor run), memory, bytes."""
    out = []
    for s in sizes:
        for name, r in s["stages"].items():
            f = floor["stages"][name]
            steps = {name: (r["records"], r["seconds"], f["seconds"], f["records"])}
            if name.startswith("loader"):  # record_info + sampler grow with the data; the batches do not
                st, fs = r["steps"], f["steps"]
                steps = {
                    f"{name}: record_info + sampler": (r["records"], st["record_info"] + st["sampler"],
                                                       fs["record_info"] + fs["sampler"], f["records"]),
                    f"{name}: batches": (r["samples"], st["batches"], None, None),
                }  # fmt: skip
            for stage, (records, seconds, floor_s, floor_n) in steps.items():
                net = None
                if floor_s is not None and seconds > floor_s and records > floor_n:
                    net = (records - floor_n) / (seconds - floor_s)
                out.append({
                    "stage": stage, "size": s["records"], "records": records, "seconds": round(seconds, 4),
                    "records_per_s": round(records / seconds, 1), "net_records_per_s": net and round(net, 1),
                    "peak_mib": r["peak_mib"], "output_bytes": r["output_bytes"],
                })  # fmt: skip
    return out


def figures(rows: list[dict], sizes: list[int]) -> list[dict]:
    """The harness's rows: per stage, records/s at the largest size against the smallest (net of the floor run,
    target >= 0.8) and peak memory at the largest size against the one before (target <= 1.5)."""
    if len(sizes) < 2:
        return []
    big, small, before = sizes[-1], sizes[0], sizes[-2]
    at = {(r["stage"], r["size"]): r for r in rows}
    out = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        a, b, c = at[(stage, big)], at[(stage, small)], at[(stage, before)]
        key = "net_records_per_s" if a["net_records_per_s"] and b["net_records_per_s"] else "records_per_s"
        net = " (net of the floor run)" if key.startswith("net") else ""
        out.append(
            figure(
                B,
                f"{stage}: records/s at {big:,} records{net}",
                "records/s",
                a[key],
                b[key],
                f"at {small:,} records",
                ("ratio", ">=", 0.8),
            )
        )
        if not stage.endswith("batches"):
            out.append(
                figure(
                    B,
                    f"{stage}: peak memory of the process tree at {big:,} records",
                    "MiB",
                    a["peak_mib"],
                    c["peak_mib"],
                    f"at {before:,} records",
                    ("ratio", "<=", 1.5),
                )
            )
    return out  # fmt: skip


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Measured {m['date']} with `{result['command']}` in {result['seconds_total'] / 60:.1f} min on {m['cpu']}, "
        f"{m['cores']} cores, {m['memory_gib']} GiB; {result['load']}. Floor run: {FLOOR} records.",
        "",
        "| stage | records | seconds | records/s | net records/s | peak MiB (tree) | output MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        result["rows"],
        key=lambda r: (list(dict.fromkeys(x["stage"] for x in result["rows"])).index(r["stage"]), r["size"]),
    ):
        net = f"{r['net_records_per_s']:,.0f}" if r["net_records_per_s"] else "-"
        lines.append(f"| {r['stage']} | {r['records']:,} | {r['seconds']:,.1f} | {r['records_per_s']:,.0f} | {net} | "
                     f"{r['peak_mib']:,.0f} | {r['output_bytes'] / 1e6:,.1f} |")  # fmt: skip
    lines += ["", "The HDF5 writer's two steps (seconds, and microseconds per record):", "",
              "| stage | records | examples: check, tokenise, spool | shuffle into the files |", "|---|---|---|---|"]  # fmt: skip
    for size in result["measured"]:
        for name, r in size["stages"].items():
            if name.startswith("hdf5") and r.get("steps"):
                ex, sh, n = r["steps"]["examples"], r["steps"]["shuffle"], r["records"]
                lines.append(
                    f"| {name} | {n:,} | {ex:,.1f} s ({ex / n * 1e6:,.0f} µs) | {sh:,.1f} s ({sh / n * 1e6:,.0f} µs) |"
                )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for stage in dict.fromkeys(r["stage"] for r in rows):
        pts = sorted((r["size"], r["seconds"], r["peak_mib"]) for r in rows if r["stage"] == stage)
        x = [p[0] for p in pts]
        left.plot(x, [p[1] for p in pts], marker="o", label=stage)
        right.plot(x, [p[2] for p in pts], marker="o", label=stage)
    sizes = sorted({r["size"] for r in rows})
    left.plot(sizes, [sizes[0] and s / sizes[0] for s in sizes], "k:", label="linear (1 s at the smallest size)")
    left.set(xscale="log", yscale="log", xlabel="records per phase", ylabel="seconds", title="time")
    right.set(xscale="log", xlabel="records per phase", ylabel="MiB", title="peak resident memory (process tree)")
    left.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False, max_size: int | None = None, out: Path = RESULTS, library: Path | None = None) -> dict:
    sizes = [n for n in (QUICK_SIZES if quick else SIZES) if max_size is None or n <= max_size]
    if not sizes:
        raise ValueError(f"--max-size {max_size} is below the smallest size {min(QUICK_SIZES if quick else SIZES)}")
    info = machine()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp, OtherWork() as other:
        root = Path(tmp)
        params = params_for(root)
        floor = measure_size(FLOOR, root, params, library)
        measured = [floor if n == FLOOR else measure_size(n, root, params, library) for n in sizes]
    share = other.share(info["cores"])
    rows = table(measured, floor)
    command = " ".join(["python -m benchmarks --only scale", *(["--quick"] if quick else []),
                        *([f"--max-size {max_size}"] if max_size else []),
                        *([f"(stages on the llava_core of {library})"] if library else [])])  # fmt: skip
    result = {
        "command": "make bench-scale" if command == "python -m benchmarks --only scale" else command,
        "machine": info,
        "seconds_total": time.perf_counter() - t0,
        "other_work_cpu_share": share,
        "load": "other work's share of the CPU unknown" if share is None else f"other work took {share:.0%} of the CPU",
        "sizes": sizes,
        "rows": rows,
        "floor": floor,
        "measured": measured,
    }
    stem = ("scale_quick" if quick else "scale") + (f"_{library.name}" if library else "")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    plot(rows, out / f"{stem}.png", f"{result['command']}, {info['date']}, {info['cpu']} ({info['cores']} cores)")
    return {"figures": figures(rows, sizes), "details": result}


def compare(before: dict, after: dict) -> str:
    """A markdown table: each stage's records/s and peak memory at each size both runs measured, side by side."""
    old = {(r["stage"], r["size"]): r for r in before["rows"]}
    lines = [
        f"Before: `{before['command']}`, {before['machine']['date']} ({before['load']}); after: `{after['command']}`, "
        f"{after['machine']['date']} ({after['load']}).",
        "",
        "| stage | records | records/s before | after | peak MiB before | after |",
        "|---|---|---|---|---|---|",
    ]
    for r in after["rows"]:
        b = old.get((r["stage"], r["size"]))
        if b is None:
            continue
        lines.append(f"| {r['stage']} | {r['size']:,} | {b['records_per_s']:,.0f} | {r['records_per_s']:,.0f} | "
                     f"{b['peak_mib']:,.0f} | {r['peak_mib']:,.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}: checks that all of it runs")
    ap.add_argument("--max-size", type=int, default=None, help=f"measure only sizes up to this of {SIZES}")
    ap.add_argument("--json", type=Path, default=None, help="write the figures and details there (the harness)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"where scale.json/.md/.png go (default {RESULTS})")
    ap.add_argument(
        "--compare",
        type=Path,
        nargs=2,
        metavar=("BEFORE", "AFTER"),
        default=None,
        help="print the table of two scale.json results side by side, and measure nothing",
    )
    ap.add_argument("--library", type=Path, default=None,
                    help="run the stages on the llava_core under this folder (an earlier checkout: the before "
                         "figures); the results' names end with its folder name")  # fmt: skip
    args = ap.parse_args(argv)
    if args.compare:
        print(compare(*(json.loads(p.read_text()) for p in args.compare)), end="")
        return
    result = run(args.quick, args.max_size, args.out, args.library)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(markdown(result["details"]))


if __name__ == "__main__":
    main()
