"""`llava-pipeline`: the stages from the command line (what `dvc.yaml` runs), and the whole chain.

    llava-pipeline [--params params.yaml] [-v | -q] <command> [<key>]

The stage commands come from the stage table (`llava_core.pipeline.STAGES`): download <source>, convert
<dataset>, hdf5 <phase>, validate <phase>, train <phase>, export, export-llava, evaluate; `all` runs them in
order. Besides them: judge, publish, import-hf, import-llava, predict, params (the params reference), plan (a
phase's memory plan), dvc-yaml (dvc.yaml, generated). A key that does not exist, or a params file with problems, is
one message naming the valid choices and exit status 2; data that fails its gate or a failing judge endpoint is one
message and exit status 1.

`all` records each stage it ran in the workspace's dvc.lock when the workspace is a DVC repository
(`llava_core.recording`; `--no-record` turns it off), as the Dagster assets do, so `dvc status` is then clean. A
stage started by DVC (`DVC_STAGE` set) first checks that dvc.yaml's entry for it is the generated one (exit 2
with the command that regenerates it otherwise).

LLAVA_STAGE_LOG=<file>: each command appends one JSON line to the file when it ends: the stage, its seconds
(after the params file is read), its exit status and its peak RSS (the largest of the process and the processes
it started, e.g. the training process): per-stage time and memory under any orchestrator (DVC, cron, CI).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from llava_core.atomic import DiskFullError
from llava_core.config import ConfigError, PipelineConfig
from llava_core.data.prompts import PROMPT_STYLES, PROMPT_SUFFIXES
from llava_core.params import load_config
from llava_core.phases import UnknownName
from llava_core.pipeline import STAGES, Stage, run_all, stage
from llava_core.training.devices import LaunchRefused
from llava_core.training.launch import TrainingStopped

log = logging.getLogger("llava_core")
STAGE_LOG = "LLAVA_STAGE_LOG"
KEY_HELP = {"source": "a name under `sources`", "dataset": "a name under `datasets`", "phase": "phase1 or phase2"}


def package_version() -> str:
    try:
        return version("llava-pipeline")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llava-pipeline", description="LLaVA training pipeline stages")
    ap.add_argument("--params", default="params.yaml", type=Path, help="params file (default: params.yaml)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = ap.add_subparsers(dest="command", required=True, metavar="<command>")
    for s in STAGES:
        p = sub.add_parser(s.command, help=s.help)
        if s.over is not None:
            p.add_argument("key", metavar=s.over, help=KEY_HELP[s.over])
        if s.name == "download":
            p.add_argument("--refetch", action="store_true", help="fetch again even when the folder is intact")
        if s.name == "train":
            _launch_options(p)
    run_all_p = sub.add_parser(
        "all", help="run every stage in order (each recorded in dvc.lock) and print the eval report"
    )
    run_all_p.add_argument("--no-record", action="store_true", help="do not record the stages in the DVC repository")
    sub.add_parser("dvc-yaml", help="print dvc.yaml, generated from the stage table and the params file")
    sub.add_parser("judge", help="judge review of reports/answers.jsonl (eval.judge) -> reports/eval.json")
    sub.add_parser("publish", help="upload the converted models to S3 (the publish section)")
    sub.add_parser("params", help="print the params.yaml reference (every key, its type and meaning)")
    plan = sub.add_parser("plan", help="a phase's memory plan per GPU (parameters, gradients, optimizer, activations)")
    plan.add_argument("key", metavar="phase", help=KEY_HELP["phase"])
    plan.add_argument("--num-processes", type=int, default=None, help="processes over all machines")
    plan.add_argument("--num-machines", type=int, default=None)
    plan.add_argument("--sequence", type=int, default=None, help="tokens per example (default: the data's longest)")
    plan.add_argument("--gpus", type=int, default=None, help="judge the fit on N GPUs of --gpu-memory-gib (not these)")
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0)
    plan.add_argument("--json", action="store_true", help="the plan as JSON")
    for command, what in (
        ("import-hf", "a Hugging Face LLaVA folder"),
        ("import-llava", "an original-LLaVA checkpoint"),
    ):
        imp = sub.add_parser(command, help=f"{what} -> a training-format checkpoint")
        imp.add_argument("source_dir", type=Path)
        imp.add_argument("--out", type=Path, default=None, help="default: <checkpoints>/imported")
        imp.add_argument("--prompt-style", default="vicuna_v1", choices=PROMPT_STYLES, help="sets the image start")
    pr = sub.add_parser("predict", help="image + prompt -> answer, from a training, HF or original-LLaVA folder")
    pr.add_argument("--model", type=Path, required=True, help="checkpoints/phase2, models/hf or models/llava")
    pr.add_argument("--image", type=Path, required=True)
    pr.add_argument("--prompt", required=True)
    pr.add_argument("--max-new-tokens", type=int, default=64)
    pr.add_argument("--prompt-style", default=None, choices=PROMPT_STYLES, help="default: recorded with the model")
    pr.add_argument("--suffix", default="none", choices=sorted(PROMPT_SUFFIXES), help="evaluation suffix to append")
    return ap


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    os.environ["LLAVA_LOG_LEVEL"] = logging.getLevelName(level)  # the training process logs at the same level


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    if args.command in ("predict", "params"):  # need no params file
        return _no_params(args)
    from llava_core.dvc_yaml import StaleDvcYaml

    try:
        cfg = load_config(args.params)
        spec = stage(_stage_name(args.command)) if _stage_name(args.command) else None
        key = spec.check_key(cfg, getattr(args, "key", None)) if spec else None  # export, evaluate: no key
        if spec is not None:
            _check_dvc_entry(cfg, spec.dvc_name(key))
        if args.command == "plan":
            return _plan(args, cfg, stage("train").check_key(cfg, args.key))
    except (ConfigError, UnknownName, LaunchRefused, StaleDvcYaml) as e:
        log.error(f"error: {e}")
        return 2
    if args.command == "dvc-yaml":
        from llava_core.dvc_yaml import render

        print(render(cfg), end="")
        return 0
    t0 = time.perf_counter()
    status = 1
    try:
        status = _run(args, cfg, spec, key, t0)
    finally:
        _log_stage(args, time.perf_counter() - t0, status)
    return status


def _check_dvc_entry(cfg: PipelineConfig, name: str) -> None:
    """Under DVC (it sets DVC_STAGE and DVC_ROOT for a stage's command), refuse an out-of-date dvc.yaml entry."""
    if os.environ.get("DVC_STAGE") != name:
        return
    from llava_core.dvc_yaml import check_stage

    check_stage(cfg, Path(os.environ.get("DVC_ROOT", cfg.root)) / "dvc.yaml", name)


def _stage_name(command: str) -> str | None:
    return next((s.name for s in STAGES if s.command == command), None)


def _no_params(args: argparse.Namespace) -> int:
    if args.command == "params":
        from llava_core.params import params_reference

        print(params_reference(), end="")
        return 0
    from llava_core.evaluation.predict import predict

    r = predict(
        args.model,
        args.image,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        prompt_style=args.prompt_style,
        suffix=args.suffix,
    )
    print(json.dumps({"answer": r.answer, "format": r.format, "prompt": r.prompt}, indent=2))
    return 0


def _run(args: argparse.Namespace, cfg: PipelineConfig, spec: Stage | None, key, t0: float) -> int:
    from llava_core.data.validate import ValidationFailed
    from llava_core.evaluation.judge import JudgeError
    from llava_core.recording import RecordError

    try:
        if spec is not None:
            extra = {"refetch": args.refetch} if spec.name == "download" else {}
            if spec.name == "train":
                extra = {"num_processes": args.num_processes, "machines": _machines(args)}
            result = spec.run(cfg, **extra) if key is None else spec.run(cfg, key, **extra)
        elif args.command == "all":
            result = run_all(cfg, log=log.info, after=_recorder(args, cfg))["evaluate"]
            log.info(f"pipeline finished in {time.perf_counter() - t0:.1f} s")
        else:
            result = _extra_command(args, cfg)
    except JudgeError as e:  # the answers are already on disk
        log.error(f"error: judge review failed: {e}")
        return 1
    except (
        ValidationFailed,
        FileNotFoundError,
        DiskFullError,
        TrainingStopped,
        RecordError,
    ) as e:  # gate, input, disk, SIGTERM, dvc commit
        log.error(f"error: {e}")
        return 1
    except LaunchRefused as e:  # a launch this machine cannot run: refused before the training process starts
        log.error(f"error: {e}")
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


def _launch_options(p: argparse.ArgumentParser) -> None:
    """`train`'s launch options: they override the accelerate config's (docs/gpus-and-clusters.md)."""
    p.add_argument("--num-processes", type=int, default=None, help="processes over all machines")
    p.add_argument("--num-machines", type=int, default=None, help="machines of a multi-machine launch")
    p.add_argument("--machine-rank", type=int, default=None, help="this machine's rank (0: the main machine)")
    p.add_argument("--main-process-ip", default=None, help="the main machine's address")
    p.add_argument("--main-process-port", type=int, default=None)
    p.add_argument("--rdzv-backend", default=None, choices=("static", "c10d"), help="rendezvous (default static)")


def _machines(args: argparse.Namespace):
    from llava_core.training.launch import Machines

    return Machines(args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port,
                    args.rdzv_backend)  # fmt: skip


def _plan(args: argparse.Namespace, cfg: PipelineConfig, phase: str) -> int:
    from llava_core.training.devices import Gpu, visible_gpus
    from llava_core.training.memory import plan_for

    plan = plan_for(cfg, phase, args.num_processes, args.num_machines, args.sequence)
    if args.gpus:
        gpus = [
            Gpu(i, f"a {args.gpu_memory_gib:g} GiB GPU", int(args.gpu_memory_gib * 2**30)) for i in range(args.gpus)
        ]
    else:
        gpus = visible_gpus()
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.render(gpus))
    return 0


def _recorder(args: argparse.Namespace, cfg: PipelineConfig):
    """What `all` calls after each stage: `dvc commit` of it when the workspace is the DVC repository."""
    from llava_core.recording import dvc_workspace, record_stage

    root, why_not = dvc_workspace(cfg, args.params)
    if args.no_record or root is None:
        log.info(f"stages not recorded in dvc.lock: {'--no-record' if args.no_record else why_not}")
        return None

    def record(s: Stage, key) -> None:
        record_stage(root, s.dvc_name(key))
        log.info(f"    recorded {s.dvc_name(key)} in {root / 'dvc.lock'}")

    return record


def _extra_command(args: argparse.Namespace, cfg: PipelineConfig) -> dict:
    from llava_core.pipeline import plain

    if args.command == "judge":
        from llava_core.evaluation.evaluate import judge_answers

        return judge_answers(cfg).report
    if args.command == "publish":
        from llava_core.model.publish import publish

        return plain(publish(cfg))
    out = args.out or cfg.path("checkpoints") / "imported"
    if args.command == "import-llava":
        from llava_core.model.original import import_llava

        return plain(import_llava(args.source_dir, out, args.prompt_style))
    from llava_core.model.hf import import_hf  # import-hf

    return plain(import_hf(args.source_dir, out, args.prompt_style))


def _log_stage(args: argparse.Namespace, seconds: float, status: int) -> None:
    """One JSON line in $LLAVA_STAGE_LOG (appended: one short write, whole even from parallel stages)."""
    path = os.environ.get(STAGE_LOG)
    if not path:
        return
    name = " ".join([args.command] + ([str(args.key)] if getattr(args, "key", None) else []))
    record = {"stage": name, "seconds": round(seconds, 3), "exit": status, "peak_rss_mib": round(peak_rss_mib(), 1)}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def peak_rss_mib() -> float:
    """The peak resident memory of this process or of a process it waited for, whichever is larger.

    This process's own is VmHWM (its memory since exec): `ru_maxrss` of RUSAGE_SELF also keeps the peak of the
    process it was forked from, e.g. a large orchestrator process. A child's (RUSAGE_CHILDREN) is a peak too.
    """
    own = None
    try:
        with open("/proc/self/status") as f:
            own = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)  # KiB
    except OSError:
        pass
    if own is None:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


if __name__ == "__main__":
    sys.exit(main())
