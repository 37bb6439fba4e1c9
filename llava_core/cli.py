"""`llava-pipeline`: the stages from the command line (what `dvc.yaml` runs), and the whole chain.

llava-pipeline [--params params.yaml] download <source>
llava-pipeline convert <dataset>
llava-pipeline hdf5 <phase>
llava-pipeline validate <phase>   # Great Expectations gate: exit status 1 and a summary when the data fails
llava-pipeline train <phase>
llava-pipeline export
llava-pipeline export-llava   # checkpoints/phase2 -> models/llava (original LLaVA repository layout)
llava-pipeline evaluate
llava-pipeline judge          # judge review of reports/answers.jsonl (eval.judge) -> reports/eval.json
llava-pipeline publish        # upload models/<hf|llava> to S3 (publish section)
llava-pipeline import-hf <hf folder> [--out DIR]   # Hugging Face LLaVA -> training-format checkpoint
llava-pipeline predict --model DIR --image IMG --prompt TEXT   # any checkpoint format
llava-pipeline all            # every stage in order, then print the eval report

LLAVA_STAGE_LOG=<file>: each command appends one JSON line to the file when it ends: the stage, its seconds
(after the params file is read), its exit status and its peak RSS (the largest of the process and the processes
it started, e.g. the training process): per-stage time and memory under any orchestrator (DVC, cron, CI).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from llava_core import pipeline
from llava_core.config import PROMPT_SUFFIXES, ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llava-pipeline", description="LLaVA training pipeline stages")
    ap.add_argument("--params", default="params.yaml", type=Path, help="params file (default: params.yaml)")
    sub = ap.add_subparsers(dest="stage", required=True)
    d = sub.add_parser("download", help="stage 1: fetch a source into data/raw/<source>")
    d.add_argument("source")
    d.add_argument("--refetch", action="store_true", help="fetch again even when the folder is intact")
    sub.add_parser("convert", help="stage 2: a source file -> data/jsonl/<dataset>.jsonl").add_argument("dataset")
    sub.add_parser("hdf5", help="stage 3: jsonl -> data/hdf5/<phase>").add_argument("phase")
    sub.add_parser(
        "validate", help="stage 3 gate: Great Expectations suites -> data/hdf5/<phase>.validation.json"
    ).add_argument("phase")
    t = sub.add_parser("train", help="stage 4: train one phase under accelerate launch")
    t.add_argument("phase")
    t.add_argument("--num-processes", type=int, default=None)
    sub.add_parser("export", help="stage 5a: checkpoints/phase2 -> models/hf")
    sub.add_parser("export-llava", help="stage 5a: checkpoints/phase2 -> models/llava (original LLaVA layout)")
    sub.add_parser("evaluate", help="stage 5b: answer the held-out questions -> reports/eval.json")
    sub.add_parser("judge", help="judge review of reports/answers.jsonl (eval.judge) -> reports/eval.json")
    sub.add_parser("publish", help="upload the converted models to S3 (the publish section)")
    imp = sub.add_parser("import-hf", help="a Hugging Face LLaVA folder -> a training-format checkpoint")
    imp.add_argument("hf_dir", type=Path)
    imp.add_argument("--out", type=Path, default=None, help="default: <checkpoints>/imported")
    imp.add_argument("--prompt-style", default="vicuna_v1", help="sets the image_patch_start_idx recorded")
    pr = sub.add_parser("predict", help="image + prompt -> answer, from a training, HF or original-LLaVA folder")
    pr.add_argument("--model", type=Path, required=True, help="checkpoints/phase2, models/hf or models/llava")
    pr.add_argument("--image", type=Path, required=True)
    pr.add_argument("--prompt", required=True)
    pr.add_argument("--max-new-tokens", type=int, default=64)
    pr.add_argument("--prompt-style", default=None, help="default: the one recorded with the model, else vicuna_v1")
    pr.add_argument("--suffix", default="none", choices=sorted(PROMPT_SUFFIXES), help="evaluation suffix to append")
    sub.add_parser("all", help="run every stage in order and print the eval report")
    args = ap.parse_args(argv)

    if args.stage == "predict":  # needs no params file
        from llava_core.predict import predict

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
    try:
        cfg = load_config(args.params)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    status = 1
    try:
        status = _run_stage(args, cfg, t0)
    finally:
        _log_stage(args, time.perf_counter() - t0, status)
    return status


STAGE_LOG = "LLAVA_STAGE_LOG"


def _log_stage(args: argparse.Namespace, seconds: float, status: int) -> None:
    """One JSON line in $LLAVA_STAGE_LOG (appended: one short write, whole even from parallel stages)."""
    path = os.environ.get(STAGE_LOG)
    if not path:
        return
    name = " ".join([args.stage] + [str(getattr(args, a)) for a in ("source", "dataset", "phase") if hasattr(args, a)])
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


def _run_stage(args: argparse.Namespace, cfg, t0: float) -> int:
    if args.stage == "download":
        result = pipeline.run_download(cfg, args.source, refetch=args.refetch)
    elif args.stage == "convert":
        result = pipeline.run_convert(cfg, args.dataset)
    elif args.stage == "hdf5":
        result = pipeline.run_hdf5(cfg, args.phase)
    elif args.stage == "validate":
        result = _clean_error(pipeline.run_validate, cfg, args.phase)
    elif args.stage == "train":
        result = pipeline.run_train(cfg, args.phase, num_processes=args.num_processes)
    elif args.stage == "export":
        result = pipeline.run_export(cfg)
    elif args.stage == "export-llava":
        result = pipeline.run_export_llava(cfg)
    elif args.stage == "evaluate":
        result = _clean_error(pipeline.run_evaluate, cfg)
    elif args.stage == "judge":
        result = _clean_error(pipeline.run_judge, cfg)
    elif args.stage == "publish":
        result = pipeline.run_publish(cfg)
    elif args.stage == "import-hf":
        result = pipeline.run_import_hf(cfg, args.hf_dir, args.out, args.prompt_style)
    else:
        result = _clean_error(pipeline.run_all, cfg)
        if result is None:
            return 1
        print(json.dumps(result["eval"], indent=2))
        print(f"pipeline finished in {time.perf_counter() - t0:.1f} s")
        return 0
    if result is None:
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


def _clean_error(run, cfg, *args):
    """Errors a user acts on are one clear message on stderr and exit status 1, not a traceback: a failing judge
    endpoint (the answers are already on disk) and data that fails its validation gate (the summary)."""
    from llava_core.judge import JudgeError
    from llava_core.validate import ValidationFailed

    try:
        return run(cfg, *args)
    except JudgeError as e:
        print(f"error: judge review failed: {e}", file=sys.stderr)
    except ValidationFailed as e:
        print(f"error: {e}", file=sys.stderr)
    return None


if __name__ == "__main__":
    sys.exit(main())
