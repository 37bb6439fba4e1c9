"""The whole tiny pipeline run directly, through Dagster and through DVC: overhead, re-runs, peak memory per stage.

    python -m benchmarks.bench_pipeline [--quick | --workspace default] [--json PATH]

One workspace recipe: `make bench`'s reduced one (the embedded synthetic source with a few hundred records,
one short epoch per phase), `--workspace default` the embedded default exactly as `make demo` runs it (about
25 min: four whole pipelines), `--quick` a few dozen records and the download stage only. Each way runs in its
own fresh workspace and fresh processes, timed from outside as a user starts it:
- direct: the stage functions called in order in one process (`llava_core.pipeline.run_all`, what
  `llava-pipeline all` runs) - the baseline;
- Dagster: the `llava_pipeline` job (`llava_data` with `--quick`) of the project's Definitions on a real
  instance (DAGSTER_HOME with the project's dagster.yaml), in a git + DVC repository as the project is (every
  asset also records itself in dvc.lock), once with each executor: `multiprocess` (the default: a process per
  step, forked from a server holding the stages' imports) and `in_process` (`LLAVA_EXECUTOR=in_process`);
- `dvc repro` in another git + DVC repository holding the project's stages; each stage (`llava-pipeline
  <stage>`, its own process) logs its time and peak RSS through LLAVA_STAGE_LOG (the largest of the process
  and the processes it waited for: the training process for `train`). Those are the memory figures, each
  beside the stage's import floor (a process that only imports the stage's code).
Then the re-run with nothing changed: `dvc repro` again, and for Dagster what the UI's "Materialize changed
and missing" does: the job's assets that are not fresh (stale status from the instance), none -> no run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    PROJECT,
    WORKSPACES,
    bench_main,
    check,
    figure,
    timed_process,
    tiny_params,
    venv_env,
    write_params,
)
from llava_core.artifacts import RUN_STATS
from orchestration.dvc import dvc_executable

REDUCED = {
    "source": {"num_pretrain": 192, "num_instruct": 192, "num_eval_images": 8},
    "train": {p: {"epochs": 1, "global_batch_size": 16, "micro_batch_size": 16} for p in ("phase1", "phase2")},
}
QUICK = {"source": {"num_pretrain": 16, "num_instruct": 16, "num_eval_images": 2}, "train": {}}
SIZES = {"reduced": REDUCED, "default": {"source": {}, "train": {}}, "quick": QUICK}  # default: params.yaml as is
QUICK_STAGES = ("download",)  # --quick: the first stage only (checks that every way runs; no figure to read)
# what each stage's process imports before it does any work (its memory floor), by stage name
FLOOR_MODULES = {
    "download": "llava_core.data.sources",
    "convert": "llava_core.data.convert",
    "hdf5": "llava_core.data.hdf5_writer, llava_core.data.tokenizer",
    "validate": "llava_core.data.validate",
    "train": "llava_core.training.recipe",
    "export_hf": "llava_core.model.hf",
    "export_llava": "llava_core.model.original",
    "evaluate": "llava_core.evaluation.evaluate",
}
EXECUTORS = ("multiprocess", "in_process")  # the code location's default first (LLAVA_EXECUTOR)
EXECUTOR_NOTE = {
    "multiprocess": "a process per step, forked from a server that imported the stages' libraries once per run",
    "in_process": "every step in the run's process (LLAVA_EXECUTOR=in_process)",
}
MAX_RERUN_S = 10.0
MAX_OVERHEAD = 1.10


def _params(root: str, size: str) -> dict:
    return tiny_params(Path(root), SIZES[size]["source"], SIZES[size]["train"])


def _steps(params: Path, quick: bool) -> list:
    """The (stage, key) steps of the chain (`--quick`: those of QUICK_STAGES)."""
    from llava_core.params import load_config
    from llava_core.pipeline import steps

    return [(s, k) for s, k in steps(load_config(params)) if not quick or s.name in QUICK_STAGES]


def _step_name(stage, key) -> str:
    """As the CLI and LLAVA_STAGE_LOG name a step: `download synthetic_shapes`, `export-llava`."""
    return stage.command if key is None else f"{stage.command} {key}"


def _stage_of(step: str) -> str:
    """The stage name of a step logged by the CLI (`export-llava` -> `export_llava`)."""
    from llava_core.pipeline import STAGES

    command = step.split()[0]
    return next(s.name for s in STAGES if s.command == command)


def _repo(repo: Path, size: str) -> Path:
    """A git + DVC repository holding the project's stages and a params.yaml for this workspace (root ".")."""
    repo.mkdir(parents=True)
    for name in ("llava_core", "configs"):
        shutil.copytree(PROJECT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(PROJECT / name, repo / name)
    params = write_params(repo / "params.yaml", _params(".", size))
    for cmd in (["git", "init", "-q"], [dvc_executable(), "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=venv_env(), check=True, capture_output=True)
    return params


def _dagster_home(home: Path) -> Path:
    """DAGSTER_HOME as `make dagster` makes it (the project's dagster.yaml), its storage created, as a user's
    instance already is (creating the SQLite schema takes seconds, once)."""
    import dagster as dg

    home.mkdir()
    shutil.copy(PROJECT / "configs/dagster/dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)):
        pass
    return home


def _loop_seconds(root: Path) -> float:
    """The training loops' own seconds in a workspace (each phase's run_stats.json), 0 without training."""
    return sum(json.loads(p.read_text())["seconds"] for p in root.glob(f"checkpoints/*/{RUN_STATS}"))


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


# --- the ways, each in its own process ----------------------------------------------------------------------
def _direct(params: str, quick: bool) -> dict:
    """In a fresh process: the stage functions in order (run_all, or its data stages with --quick)."""
    from llava_core.params import load_config
    from llava_core.pipeline import run_all

    cfg = load_config(params)
    if not quick:
        return {"seconds_by_stage": run_all(cfg, log=lambda _m: None)["seconds"]}
    seconds = {}
    for stage, key in _steps(Path(params), quick):
        t0 = time.perf_counter()
        stage.run(cfg) if key is None else stage.run(cfg, key)
        seconds[_step_name(stage, key)] = round(time.perf_counter() - t0, 2)
    return {"seconds_by_stage": seconds}


def _dagster(params: str, home: str, job: str, stale_only: bool, quick: bool) -> dict:
    """In a fresh process (LLAVA_PARAMS set): the job on the instance in `home` (`quick`: its download
    assets); with `stale_only`, only those that are not fresh, and no run at all when every one is."""
    import dagster as dg
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository
    from dagster._time import get_current_datetime

    t0 = time.perf_counter()
    from orchestration.definitions import defs

    out = {"code_location_load_s": time.perf_counter() - t0}
    job_def = defs.resolve_job_def(job)
    graph = defs.resolve_asset_graph()
    keys = {
        k for k in job_def.asset_layer.executable_asset_keys if not quick or graph.get(k).group_name in QUICK_STAGES
    }
    selection = sorted(keys) if quick else None
    with dg.DagsterInstance.from_config(home) as instance:
        if stale_only:
            t1 = time.perf_counter()
            view = AssetGraphView(
                temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                instance=instance,
                asset_graph=graph,
            )
            resolver = CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
            selection = sorted(k for k in keys if resolver.get_status(k) != StaleStatus.FRESH)
            out["stale_check_s"] = time.perf_counter() - t1
            out["not_fresh"] = [k.to_user_string() for k in selection]
            if not selection:
                return {**out, "ran": False, "success": True}
        repo = ReconstructableRepository.for_module("orchestration.definitions", "defs", str(PROJECT))
        t2 = time.perf_counter()
        result = dg.execute_job(ReconstructableJob(repo, job), instance=instance, asset_selection=selection)
        out["run_s"] = time.perf_counter() - t2
        out.update(ran=True, success=result.success, steps=_step_seconds(instance, result.run_id))
    return out


def _step_seconds(instance, run_id: str) -> dict[str, float]:
    """Each step's duration from the run's event log (start to success or failure)."""
    import dagster as dg

    start, end = {}, {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            start[event.step_key] = record.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            end[event.step_key] = record.timestamp
    return {k: round(end[k] - start[k], 2) for k in start if k in end}


def _in_process(args: list[str], env: dict | None = None) -> dict:
    """`python -m benchmarks.bench_pipeline <args>` timed from outside; its JSON answer merged in."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        r = check(timed_process([sys.executable, "-m", "benchmarks.bench_pipeline", *args, f.name], env=env), args[0])
        return {**json.loads(Path(f.name).read_text()), "seconds": r["seconds"]}


def run(quick: bool = False, workspace: str = WORKSPACES[0]) -> dict:
    size = "quick" if quick else workspace
    params_dict = _params(".", size)
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        m = _measure(Path(tmp), size, params_dict, quick)
    source = params_dict["sources"]["synthetic_shapes"]["options"]
    details = {
        "workspace": size,
        "source": source,
        "train": params_dict["train"],
        "workspace_bytes": m["workspace_bytes"],
        "direct": m["direct"],
        "dagster": m["dagster"],
        "dagster_rerun": m["dagster_again"],
        "dvc_repro_s": m["dvc"]["seconds"],
        "dvc_stages": m["per_stage"],
        "dvc_repro_again_s": m["dvc_again"]["seconds"],
        "dvc_repro_again_output": m["dvc_again"]["output"][-2000:],
        "import_floor_mib": m["floors"],
        "training_loop_s": m["loops"],
    }
    return {"figures": _orchestration_figures(m, quick) + _memory_figures(m, source), "details": details}


def _measure(tmp: Path, size: str, params_dict: dict, quick: bool) -> dict:
    """Each way in its own workspace and processes: direct, Dagster with each executor (and its re-run), `dvc
    repro` (and its re-run), then each stage's import floor."""
    job = "llava_data" if quick else "llava_pipeline"
    q = ["--quick"] if quick else []
    # 1. direct: the stage functions in one process
    direct_params = write_params(tmp / "direct/params.yaml", params_dict)
    m: dict = {"direct": _in_process(["direct", str(direct_params), *q])}
    m["loops"] = {"direct": _loop_seconds(direct_params.parent)}
    # 2. Dagster on a real instance, in a git + DVC repository, with each executor
    m["dagster"] = {}
    for executor in EXECUTORS:
        home = _dagster_home(tmp / f"dagster_home_{executor}")
        params = _repo(tmp / f"dagster_repo_{executor}", size)
        env = venv_env(LLAVA_PARAMS=str(params), DAGSTER_HOME=str(home), LLAVA_EXECUTOR=executor)
        m["dagster"][executor] = _in_process(["dagster", str(params), str(home), job, *q], env)
        m["loops"][executor] = _loop_seconds(params.parent)
        if executor == EXECUTORS[0]:  # 3. what is not fresh, with nothing changed
            m["dagster_again"] = _in_process(["dagster", str(params), str(home), job, "--stale-only", *q], env)
    # 4. dvc repro, each stage logging its time and peak memory (LLAVA_STAGE_LOG); again, nothing changed
    dvc_params = _repo(tmp / "dvc_repo", size)
    log = tmp / "stages.jsonl"
    targets = [s.dvc_name(k) for s, k in _steps(dvc_params, quick)] if quick else []
    dvc_cmd = [dvc_executable(), "repro", *targets]
    m["dvc"] = check(timed_process(dvc_cmd, dvc_params.parent, venv_env(LLAVA_STAGE_LOG=str(log))), "dvc repro")
    m["dvc_again"] = check(timed_process(dvc_cmd, dvc_params.parent), "dvc repro (nothing changed)")
    m["per_stage"] = [json.loads(line) for line in log.read_text().splitlines()]
    m["loops"]["dvc"] = _loop_seconds(dvc_params.parent)
    m["workspace_bytes"] = sum(_du(dvc_params.parent / d) for d in ("data", "checkpoints", "models", "reports"))
    # 5. each stage's import floor: a process that imports the stage's code and exits
    m["floors"] = {}
    for stage, _key in _steps(direct_params, quick):
        module = FLOOR_MODULES[stage.name]
        if module not in m["floors"]:
            code = f"import llava_core.cli, {module}; print(llava_core.cli.peak_rss_mib())"
            m["floors"][module] = float(
                check(timed_process([sys.executable, "-c", code]), module)["output"].split()[-1]
            )
    return m


def _orchestration_figures(m: dict, quick: bool) -> list[dict]:
    """Dagster (each executor) and dvc repro against the direct run; the re-runs with nothing changed."""
    base, loops, dagster, dvc = m["direct"]["seconds"], m["loops"], m["dagster"], m["dvc"]
    what = "download stage" if quick else "whole pipeline"
    job = "llava_data" if quick else "llava_pipeline"
    stages_s = sum(r["seconds"] for r in m["per_stage"])
    direct_name = "direct: the stage functions in one process"

    def overhead(seconds: float, way: str) -> str:
        """The overhead, and the same without the training loops' own time (the same work each way, whose
        speed on a shared machine varies from run to run more than the orchestration costs)."""
        text = f"overhead {seconds - base:+.0f} s"
        if loops[way] or loops["direct"]:
            outside = (seconds - loops[way]) - (base - loops["direct"])
            text += (
                f", {outside:+.0f} s outside the training loops ({outside / base:.0%} of direct; the loops took "
                f"{loops[way]:.0f} s here, {loops['direct']:.0f} s direct)"
            )
        return text

    figures = [
        figure("orchestration", f"{what} through Dagster ({job}, {executor} executor)", "s", d["seconds"], base,
               direct_name, ("ratio", "<=", MAX_OVERHEAD),
               note=f"{overhead(d['seconds'], executor)}; {EXECUTOR_NOTE[executor]}")
        for executor, d in dagster.items()
    ]  # fmt: skip
    again = m["dagster_again"]
    return figures + [
        figure("orchestration", f"{what} through dvc repro", "s", dvc["seconds"], base, direct_name,
               ("ratio", "<=", MAX_OVERHEAD),
               note=f"{overhead(dvc['seconds'], 'dvc')}; the stage commands' own time {stages_s:.0f} s, DVC and "
                    f"the stage processes' start the rest"),
        figure("orchestration", "re-run with nothing changed: dvc repro", "s", m["dvc_again"]["seconds"],
               dvc["seconds"], "the first dvc repro", ("ours", "<", MAX_RERUN_S),
               note="ran nothing" if "Running stage" not in m["dvc_again"]["output"] else "RAN A STAGE"),
        figure("orchestration", "re-run with nothing changed: Dagster, materialise what is not fresh", "s",
               again["seconds"], dagster[EXECUTORS[0]]["seconds"], "the first Dagster run",
               ("ours", "<", MAX_RERUN_S),
               note="nothing stale, no run" if not again["ran"] else f"ran {again['not_fresh']}"),
    ]  # fmt: skip


def _memory_figures(m: dict, source: dict) -> list[dict]:
    """Each stage's peak RSS under dvc repro beside its import floor."""
    note = (
        f"{source['num_pretrain']} + {source['num_instruct']} records, workspace {m['workspace_bytes'] / 2**20:.0f} MiB"
    )
    return [
        figure("memory", f"peak RSS: {r['stage']} (under dvc repro)", "MiB", r["peak_rss_mib"],
               round(m["floors"][FLOOR_MODULES[_stage_of(r["stage"])]], 1),
               "its import floor (a process importing its code)", note=note)
        for r in m["per_stage"]
    ]  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("direct", "dagster"):  # one way, in this process (see run)
        args, out = sys.argv[2:-1], Path(sys.argv[-1])
        quick, stale = "--quick" in args, "--stale-only" in args
        args = [a for a in args if not a.startswith("--")]
        result = _direct(args[0], quick) if sys.argv[1] == "direct" else _dagster(*args, stale_only=stale, quick=quick)
        out.write_text(json.dumps(result, default=str))
        return
    bench_main(run, __doc__, workspace=WORKSPACES)


if __name__ == "__main__":
    main()
