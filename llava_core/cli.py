"""`llava-pipeline`: the stages from the command line (what `dvc.yaml` runs), and the whole chain.

llava-pipeline [--params params.yaml] download <source>
llava-pipeline convert <dataset>
llava-pipeline hdf5 <phase>
llava-pipeline train <phase>
llava-pipeline export
llava-pipeline evaluate
llava-pipeline all            # every stage in order, then print the eval report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llava_core import pipeline
from llava_core.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llava-pipeline", description="LLaVA training pipeline stages")
    ap.add_argument("--params", default="params.yaml", type=Path, help="params file (default: params.yaml)")
    sub = ap.add_subparsers(dest="stage", required=True)
    sub.add_parser("download", help="stage 1: fetch a source into data/raw/<source>").add_argument("source")
    sub.add_parser("convert", help="stage 2: a source file -> data/jsonl/<dataset>.jsonl").add_argument("dataset")
    sub.add_parser("hdf5", help="stage 3: jsonl -> data/hdf5/<phase>").add_argument("phase")
    t = sub.add_parser("train", help="stage 4: train one phase under accelerate launch")
    t.add_argument("phase")
    t.add_argument("--num-processes", type=int, default=None)
    sub.add_parser("export", help="stage 5a: checkpoints/phase2 -> models/hf")
    sub.add_parser("evaluate", help="stage 5b: answer the held-out questions -> reports/eval.json")
    sub.add_parser("all", help="run every stage in order and print the eval report")
    args = ap.parse_args(argv)

    try:
        cfg = load_config(args.params)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.stage == "download":
        result = pipeline.run_download(cfg, args.source)
    elif args.stage == "convert":
        result = pipeline.run_convert(cfg, args.dataset)
    elif args.stage == "hdf5":
        result = pipeline.run_hdf5(cfg, args.phase)
    elif args.stage == "train":
        result = pipeline.run_train(cfg, args.phase, num_processes=args.num_processes)
    elif args.stage == "export":
        result = pipeline.run_export(cfg)
    elif args.stage == "evaluate":
        result = pipeline.run_evaluate(cfg)
    else:
        result = pipeline.run_all(cfg)
        print(json.dumps(result["eval"], indent=2))
        print(f"pipeline finished in {time.perf_counter() - t0:.1f} s")
        return 0
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
