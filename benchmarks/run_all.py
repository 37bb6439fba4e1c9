"""`make bench`: every benchmark, each in its own process, each figure beside its baseline measured in the same run.

    python -m benchmarks [--quick] [--only hdf5,loader,...] [--out DIR]
    python -m benchmarks --only pipeline --workspace default    # the orchestration on make demo's workspace
    python -m benchmarks --only scale [--max-size N]            # the growth benchmark (make bench-scale, ~30 min)

Writes `<out>/results.json` (figures, details, the machine) and `<out>/results.md` (the table docs/performance.md
shows); `--quick` (small sizes: checks that everything runs, figures not meaningful) writes
`results_quick.json` / `results_quick.md` instead, `--workspace default` (the pipeline benchmark on the
embedded default workspace, about 25 min) `results_default_workspace.*`. Exit status 1 when a benchmark failed
(its row says why).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import PROJECT, WORKSPACES, OtherWork, figure, load_average, machine, venv_env

BENCHMARKS = {  # name -> module; run in this order
    "hdf5": "benchmarks.bench_hdf5",
    "loader": "benchmarks.bench_loader",
    "train": "benchmarks.bench_train",
    "pipeline": "benchmarks.bench_pipeline",  # orchestration and memory rows
    "gpu": "benchmarks.gpu_bench",
    "scale": "benchmarks.bench_scale",  # growth with the data (not in make bench: about 30 min)
}
DEFAULT = [name for name in BENCHMARKS if name != "scale"]  # what `make bench` runs
RESULTS = PROJECT / "benchmarks" / "results"


WORKSPACE_SIZED = ("pipeline",)  # the benchmarks that take --workspace


def run_one(name: str, quick: bool, workspace: str = WORKSPACES[0], extra: tuple = ()) -> tuple[dict, float]:
    """One benchmark's {"figures", "details"} (a failed one: a row saying so) and its wall seconds."""
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", BENCHMARKS[name], "--json", str(out), *(["--quick"] if quick else []), *extra]
        if workspace != WORKSPACES[0]:
            cmd += ["--workspace", workspace]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=PROJECT, env=venv_env(), capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode == 0 and out.is_file():
            return json.loads(out.read_text()), seconds
    tail = (proc.stdout + proc.stderr)[-3000:]
    row = figure(name, "FAILED", "", None, None, "", note=f"exit {proc.returncode}: {tail.splitlines()[-1:]}")
    return {"figures": [row], "details": {"failed": True, "exit": proc.returncode, "output": tail}}, seconds


QUIET = 0.05  # the largest share of the machine's CPU other work may take for the figures to count as quiet


def busy(share: float | None) -> str:
    """What the CPU other processes took during the run says of the figures (the load average cannot: it
    counts the benchmarks' own processes)."""
    if share is None:
        return "other work's share of the CPU unknown (no /proc/stat)"
    if share > QUIET:
        return f"busy: other work took {share:.0%} of the CPU during the run (noisy figures)"
    return f"quiet: other work took {share:.1%} of the CPU during the run"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Measured {m['date']} with `{result['command']}` in {result['seconds_total'] / 60:.1f} min on {m['cpu']}, "
        f"{m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; Python {m['python']}, "
        f"torch {m['torch']}. Load average (1, 5, 15 min) at start {m['load_average_start']}, at end "
        f"{m['load_average_end']}; {m['load']}.",
        "",
        "| benchmark | figure | ours | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["figures"]:
        unit = f" {r['unit']}" if r["unit"] else ""
        ours = f"{_num(r['ours'])}{unit}" if r["ours"] is not None else "not run"
        base = (
            f"{_num(r['baseline'])}{unit} ({r['baseline_name']})" if r["baseline"] is not None else r["baseline_name"]
        )
        ratio = f"{r['ratio']:.3g}" if r["ratio"] is not None else "-"
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        note = f" - {r['note']}" if r["note"] else ""
        lines.append(
            f"| {r['benchmark']} | {r['figure']}{note} | {ours} | {base} | {ratio} | {r['target'] or '-'} | {met} |"
        )
    return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.1f}"


def _command(args: argparse.Namespace, names: list[str]) -> str:
    """The command line that made these results, as the results table quotes it."""
    if not args.quick and args.workspace == WORKSPACES[0] and names == DEFAULT:
        return "make bench"
    if not args.quick and names == ["scale"] and args.max_size is None:
        return "make bench-scale"
    return " ".join(["python -m benchmarks", *(["--quick"] if args.quick else []),
                     *([f"--only {','.join(names)}"] if names != DEFAULT else []),
                     *([f"--workspace {args.workspace}"] if args.workspace != WORKSPACES[0] else []),
                     *([f"--max-size {args.max_size}"] if args.max_size is not None else [])])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repetition: checks that all runs")
    ap.add_argument(
        "--only",
        default=",".join(DEFAULT),
        help=f"comma-separated subset of {list(BENCHMARKS)} (default: all but scale)",
    )
    ap.add_argument(
        "--max-size", type=int, default=None, help="scale: the largest size it measures (default 1,000,000)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    ap.add_argument(
        "--workspace",
        choices=WORKSPACES,
        default=WORKSPACES[0],
        help="the pipeline benchmark's workspace: make bench's reduced one, or make demo's (about 25 min)",
    )
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; valid: {list(BENCHMARKS)}")
    if args.workspace != WORKSPACES[0] and (args.quick or set(names) - set(WORKSPACE_SIZED)):
        ap.error(
            f"--workspace {args.workspace} sizes only {list(WORKSPACE_SIZED)}: give --only "
            f"{','.join(WORKSPACE_SIZED)}, without --quick"
        )
    if args.max_size is not None and "scale" not in names:
        ap.error("--max-size sizes only the scale benchmark: give --only scale")
    info = {**machine(), "load_average_start": load_average()}
    t0 = time.perf_counter()
    figures, details, seconds = [], {}, {}
    with OtherWork() as other:
        for name in names:
            print(f"==> {name}", flush=True)
            extra = (
                ("--out", str(args.out), *(("--max-size", str(args.max_size)) if args.max_size else ()))
                if name == "scale"
                else ()
            )
            r, seconds[name] = run_one(name, args.quick, args.workspace, extra)
            figures += r["figures"]
            details[name] = r["details"]
            print(f"    {seconds[name]:.0f} s", flush=True)
    info["load_average_end"] = load_average()
    info["other_work_cpu_share"] = other.share(info["cores"])
    info["load"] = busy(info["other_work_cpu_share"])
    result = {
        "command": _command(args, names),
        "quick": args.quick,
        "machine": info,
        "seconds_total": time.perf_counter() - t0,
        "seconds_by_benchmark": seconds,
        "targets": {
            "met": sum(r["met"] is True for r in figures),
            "not_met": [r["figure"] for r in figures if r["met"] is False],
            "not_run": [r["figure"] for r in figures if r["target"] and r["met"] is None],
        },
        "figures": figures,
        "details": details,
    }
    stem = (
        "results_quick"
        if args.quick
        else ("results" if args.workspace == WORKSPACES[0] else f"results_{args.workspace}_workspace")
    )
    if names == ["scale"]:  # its own figures: make bench's table stays as it is
        stem = "results_scale_quick" if args.quick else "results_scale"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 1 if any(d.get("failed") for d in details.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
