"""`python -m orchestration run`: a job of the code location run from the command line on the instance of
DAGSTER_HOME, then the eval report printed, as `llava-pipeline all` prints it.

`make demo` runs the whole pipeline this way (`llava_pipeline`, on `make dagster`'s instance `.dagster_home`), so
the Dagster UI shows every asset of the quick start with its run, logs, metadata and data version; each asset
also records its stage in dvc.lock (orchestration/versioning.py), so `dvc status` has nothing to do afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import dagster as dg

JOBS = ("llava_pipeline", "llava_data", "llava_train")


def job_llava_pipeline() -> dg.JobDefinition:
    return _job("llava_pipeline")


def job_llava_data() -> dg.JobDefinition:
    return _job("llava_data")


def job_llava_train() -> dg.JobDefinition:
    return _job("llava_train")


def _job(name: str) -> dg.JobDefinition:
    from orchestration.definitions import defs

    return defs.resolve_job_def(name)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m orchestration", description="Run a job on the Dagster instance of DAGSTER_HOME."
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="<command>")
    run = sub.add_parser("run", help="run a job on the instance of DAGSTER_HOME and print the eval report")
    run.add_argument("--job", default="llava_pipeline", choices=JOBS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not os.environ.get("DAGSTER_HOME"):
        print(
            "error: DAGSTER_HOME is not set: the run is recorded there (`make demo` uses .dagster_home)",
            file=sys.stderr,
        )
        return 2
    # Every step in this process unless LLAVA_EXECUTOR says otherwise: on make demo's workspace the faster one
    # (docs/performance.md); a step process of another executor rebuilds the job from this module's function.
    os.environ.setdefault("LLAVA_EXECUTOR", "in_process")
    job = dg.reconstructable(getattr(sys.modules[__name__], f"job_{args.job}"))
    with dg.DagsterInstance.get() as instance:
        with dg.execute_job(job, instance=instance, tags={"llava/trigger": "cli"}) as result:
            print(f"run {result.run_id} of {args.job}: {'success' if result.success else 'FAILURE'}", file=sys.stderr)
            if not result.success:
                for event in result.all_events:
                    if event.is_step_failure:
                        print(f"  {event.step_key}: {event.step_failure_data.error.message.strip()}", file=sys.stderr)
                return 1
    from llava_core.params import load_config
    from orchestration.resources import default_params_path

    report = load_config(default_params_path()).report_file()
    if args.job != "llava_data" and report.is_file():
        print(json.dumps(json.loads(report.read_text()), indent=2))
    return 0
