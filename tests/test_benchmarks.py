"""The benchmarks: gpu_bench.py in its CPU smoke mode and the 7B FLOPs it projects from; the `make bench` harness
in its --quick mode (every benchmark present, ratios and verdicts from the measured figures, no time asserted)."""

from __future__ import annotations

import json
import os
import time

import pytest

from benchmarks import common, gpu_bench


def test_gpu_bench_smoke_runs_and_projects_consistently(tmp_path):
    r = gpu_bench.run(smoke=True, peak_tflops=1.0, out_dir=tmp_path)
    assert set(r["measured"]) == {"1b", "7b_layers_phase1", "7b_layers_phase2"}
    for m in r["measured"].values():
        assert m["tokens_per_s"] > 0 and m["peak_memory_gib"] is None  # CPU: no CUDA memory figure
        assert m["mfu"] == pytest.approx(m["tflops_per_s"] / 1.0)
    p1 = r["measured"]["7b_layers_phase1"]
    assert p1["trainable_parameters"] == 64 * 128 + 128 + 128 * 128 + 128  # phase 1: the projector only
    for p in r["projection_7b_8_devices"].values():
        assert p["projected_hours"] == pytest.approx(p["recipe_flops"] / (8 * 1e12 * p["measured_mfu"]) / 3600)
    assert json.loads((tmp_path / "gpu_bench_smoke.json").read_text())["smoke"] is True


def test_7b_recipe_flops_from_the_real_shapes():
    """Vicuna-7B: 6.61B matmul weights (embedding table aside); the published times imply 25-35% MFU on A100."""
    model = gpu_bench.build(gpu_bench.CLIP_L_336, gpu_bench.LLAMA_7B, "meta")
    from llava_core.training.observe import flops_model

    fm = flops_model(model)
    assert fm.lm_params == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 32000 * 4096
    assert fm.patches == 576
    for phase, seq in (("phase1", 1 + 576 + 40), ("phase2", 1 + 576 + 300)):
        flops, got_seq = gpu_bench.recipe_flops(phase, gpu_bench.CLIP_L_336, gpu_bench.LLAMA_7B, seq - 577)
        assert got_seq == seq
        hours = gpu_bench.RECIPE[phase]["published_hours_8xA100"]
        assert 0.25 < flops / (8 * 312e12 * hours * 3600) < 0.35


def test_gpu_rows_from_a_run_and_without_a_gpu(tmp_path, monkeypatch):
    """The results-table rows of the GPU script: MFU = achieved / peak TFLOP/s, the projection against the
    published times; with no GPU the same rows, marked not run."""
    r = gpu_bench.run(smoke=True, peak_tflops=1.0, out_dir=tmp_path)
    rows = {row["figure"]: row for row in gpu_bench.rows(r)}
    assert len(rows) == len(gpu_bench.ROWS) + len(gpu_bench.RECIPE)
    for key, name, target in gpu_bench.ROWS:
        assert rows[name]["ratio"] == pytest.approx(r["measured"][key]["mfu"])
        assert rows[name]["met"] == (None if target is None else r["measured"][key]["mfu"] >= target[2])
    monkeypatch.setattr(gpu_bench, "gpu_name", lambda: None)
    none = gpu_bench.harness()
    assert [row["figure"] for row in none["figures"]] == list(rows)
    assert all(row["ours"] is None and "not run" in row["note"] for row in none["figures"])


def test_other_work_counts_other_processes_not_this_runs_orphans():
    """The busy verdict counts other processes' CPU: a process this run starts is ours even when nothing waits
    for it (an orphan, as a Dagster forkserver is), one started outside the run is other work. Checked per
    process, so that other work on the machine during the test does not matter."""
    import subprocess
    import sys

    from benchmarks import run_all

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < {}: pass"

    def cpu_seen(watch: common.OtherWork, pid: int) -> float:
        (value,) = [v for (p, _start), v in watch.seen.items() if p == pid]
        return value

    with common.OtherWork(interval=0.2) as ours:
        # an orphan of ours: its parent exits at once, nothing of ours ever waits for it
        spawner = f"import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', {burn.format(1.0)!r}]).pid)"
        orphan = int(subprocess.run([sys.executable, "-c", spawner], capture_output=True, text=True).stdout)
        ours._read()  # while it burns (a CPU second takes at least a second): seen however late the sampler runs
        time.sleep(1.5)
    assert cpu_seen(ours, orphan) == -1.0  # marked as ours: its second is not other work
    env = {k: v for k, v in os.environ.items() if k != common.OtherWork.VAR}
    with common.OtherWork(interval=0.2) as other:
        # it says when its CPU second is spent and waits: read then, whatever a loaded machine does to the sampler
        code = burn.format(1.0) + "\nprint('spent', flush=True)\ntime.sleep(60)"
        stranger = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        assert stranger.stdout.readline().strip() == "spent"
        other._read()
        stranger.kill()
        stranger.wait()
        stranger.stdout.close()
    assert cpu_seen(other, stranger.pid) >= 0.9  # not marked: its CPU second counted as other work
    assert other.others >= 0.9
    assert other.share(1) == pytest.approx(min(1.0, other.others / other.seconds), abs=1e-3)
    assert run_all.busy(0.5).startswith("busy: other work took 50%")
    assert run_all.busy(0.01).startswith("quiet")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workspace", "default"], "--workspace default sizes only ['pipeline']: give --only pipeline"),
        (["--only", "pipeline", "--workspace", "default", "--quick"], "without --quick"),
        (["--only", "pipline"], "unknown benchmark(s) ['pipline']"),
        (["--only", "pipeline", "--workspace", "huge"], "invalid choice: 'huge'"),
    ],
)
def test_harness_refuses_what_it_cannot_size(argv, message, capsys):
    """The default workspace (make demo's, about 25 min) sizes only the pipeline benchmark; a mistyped name or
    size is an error naming the valid ones, before anything runs."""
    from benchmarks import run_all

    with pytest.raises(SystemExit) as e:
        run_all.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.e2e
def test_make_bench_quick_measures_every_benchmark(tmp_path):
    """`python -m benchmarks --quick`: every benchmark runs (real Dagster, DVC, training) and each row's ratio and
    verdict come from its own measured figures. Times are never asserted."""
    from benchmarks import run_all

    assert run_all.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results_quick.json").read_text())
    rows = result["figures"]
    assert {r["benchmark"] for r in rows} == {"hdf5", "loader", "train", "orchestration", "memory", "gpu"}
    names = " | ".join(r["figure"] for r in rows)
    for expected in ("writer, 1 process", "writer, 2 processes", "scaling", "second run", "DataLoader", "HF Trainer",
                     "through Dagster", "multiprocess executor", "in_process executor", "through dvc repro",
                     "re-run with nothing changed: dvc repro", "re-run with nothing changed: Dagster",
                     "peak RSS: download synthetic_shapes"):  # fmt: skip
        assert expected in names, expected
    for r in rows:
        if r["benchmark"] == "gpu":  # no GPU here
            continue
        assert r["ours"] is not None and (r["ours"] > 0 or r["target"] == "ours <= 0") and r["baseline"] > 0, r
        assert r["ratio"] == pytest.approx(r["ours"] / r["baseline"]), r
        if r["target"] is not None:
            on, op, value = r["target"].split()
            got = r["ratio"] if on == "ratio" else r["ours"]
            assert r["met"] == common.OPS[op](got, float(value)), r
    m = result["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["python"] and m["torch"] and m["date"]
    assert len(m["load_average_start"]) == len(m["load_average_end"]) == 3
    assert 0 <= m["other_work_cpu_share"] <= 1 and m["load"].startswith(("quiet", "busy"))
    assert set(result["seconds_by_benchmark"]) == set(run_all.DEFAULT) == set(run_all.BENCHMARKS) - {"scale"}
    table = (tmp_path / "results_quick.md").read_text().splitlines()
    assert "| benchmark | figure | ours | baseline | ratio | target | met |" in table
    assert sum(line.startswith("| ") for line in table) == len(rows) + 1


SCALE_STAGES = ["convert scale_pretrain", "convert scale_instruct", "hdf5 phase1", "hdf5 phase2", "validate phase1",
                "validate phase2", "loader phase2: record_info + sampler", "loader phase2: batches"]  # fmt: skip


@pytest.mark.e2e
def test_scale_benchmark_measures_every_stage_at_every_size_and_plots(tmp_path):
    """`python -m benchmarks --only scale --quick`: generated sources through every stage at each size, each row's
    figures from its own measurements, the harness's rows with their verdicts, and the plot. Times never asserted."""
    from PIL import Image

    from benchmarks import bench_scale, run_all

    assert run_all.main(["--only", "scale", "--quick", "--out", str(tmp_path)]) == 0
    detail = json.loads((tmp_path / "scale_quick.json").read_text())
    sizes = list(bench_scale.QUICK_SIZES)
    assert detail["sizes"] == sizes and detail["floor"]["records"] == bench_scale.FLOOR
    rows = {(r["stage"], r["size"]): r for r in detail["rows"]}
    assert set(rows) == {(stage, n) for stage in SCALE_STAGES for n in sizes}
    for (stage, n), r in rows.items():
        assert r["seconds"] > 0 and r["peak_mib"] > 20, r
        assert r["records_per_s"] == pytest.approx(r["records"] / r["seconds"], rel=0.01, abs=0.1)
        if stage.startswith(("convert", "hdf5", "validate")):
            assert r["records"] == n and r["output_bytes"] > 0, r
    measured = {m["records"]: m for m in detail["measured"]}
    for n in sizes:
        stages = measured[n]["stages"]
        assert stages["validate phase1"]["success"] and stages["validate phase2"]["success"]  # the data passes
        examples = stages["validate phase2"]["examples"]
        assert 0.9 * n <= examples <= n and stages["loader phase2"]["records"] == examples
        assert rows[("hdf5 phase2", n)]["output_bytes"] > examples * 4 * 288 * 4  # int32 (N, 4, MSL) at least
        assert rows[("loader phase2: batches", n)]["records"] == stages["loader phase2"]["samples"] > 0
    harness = json.loads((tmp_path / "results_scale_quick.json").read_text())
    figures = {r["figure"]: r for r in harness["figures"]}
    assert len(figures) == 2 * len(SCALE_STAGES) - 1  # records/s for each, memory for all but the batches
    for stage in SCALE_STAGES:
        speed = next(r for name, r in figures.items() if name.startswith(f"{stage}: records/s"))
        big, small = rows[(stage, sizes[-1])], rows[(stage, sizes[0])]
        key = "net_records_per_s" if "net of the floor" in speed["figure"] else "records_per_s"
        assert (speed["ours"], speed["baseline"]) == (big[key], small[key])
        assert speed["met"] == (speed["ratio"] >= 0.8)
    for r in figures.values():
        if "peak memory" in r["figure"]:
            assert r["met"] == (r["ratio"] <= 1.5) and r["ours"] > 0
    text = (tmp_path / "scale_quick.md").read_text()
    table, steps = text.split("The HDF5 writer's two steps")
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(rows) + 1
    for n in sizes:  # the writer's two steps, which add up to at most the stage's time
        for phase in ("phase1", "phase2"):
            split = measured[n]["stages"][f"hdf5 {phase}"]["steps"]
            assert 0 < split["examples"] + split["shuffle"] <= rows[(f"hdf5 {phase}", n)]["seconds"]
            assert f"| hdf5 {phase} | {n:,} | {split['examples']:,.1f} s (" in steps
    with Image.open(tmp_path / "scale_quick.png") as png:
        assert png.format == "PNG" and png.size == (1430, 550)


def test_scale_compare_puts_two_runs_side_by_side():
    from benchmarks.bench_scale import compare

    def result(date: str, rate: float, mib: float) -> dict:
        rows = [{"stage": "hdf5 phase2", "size": n, "records_per_s": rate * k, "peak_mib": mib * k}
                for k, n in enumerate((10_000, 100_000), start=1)]  # fmt: skip
        return {"command": "make bench-scale", "machine": {"date": date}, "load": "quiet", "rows": rows}

    table = compare(result("d0", 100.0, 50.0), result("d1", 300.0, 40.0)).splitlines()
    assert table[0].startswith("Before: `make bench-scale`, d0 (quiet); after: `make bench-scale`, d1 (quiet)")
    assert table[4:] == [
        "| hdf5 phase2 | 10,000 | 100 | 300 | 50 | 40 |",
        "| hdf5 phase2 | 100,000 | 200 | 600 | 100 | 80 |",
    ]


def test_writer_profile_workload_runs_the_writer_and_reports_its_rate(capsys):
    """`python -m benchmarks.writer_profile`: the pid line a profiler attaches to, then the runs' seconds and rate."""
    from benchmarks import writer_profile

    result = writer_profile.main(["--records", "64", "--runs", "2"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"pid {os.getpid()} READY"
    assert json.loads(out[-1]) == result and result["seconds"] > 0
    assert result["records_per_s"] == pytest.approx(2 * 64 / result["seconds"])
