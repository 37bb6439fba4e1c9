"""The HDF5 writer's benchmark workload, for a sampling profiler: where one writer process spends its time.

    python -m benchmarks.writer_profile [--records N] [--runs K]
    py-spy record --gil --threads -r 100 -f raw -o writer.raw --pid <the pid it prints>

It builds the `hdf5` benchmark's workspace (`bench_hdf5`: distinct multi-turn records, MSL 512), runs the writer
once to warm up, prints its pid and "READY", waits 3 s (attach the profiler then), and runs the writer `K` times
in one process, each a first run (the image checks' cache emptied). `--gil` keeps only the samples of the
thread that holds Python's GIL: their count over the runs' seconds is the share of the time Python code ran.
docs/performance.md, "Where the writer's time goes", has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.bench_hdf5 import _workspace


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=16000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    from llava_core.data.hdf5_writer import build_hdf5
    from llava_core.data.image_cache import cache_folder

    with tempfile.TemporaryDirectory(prefix="writer_profile_") as tmp:
        cfg = _workspace(Path(tmp), args.records)[0][1]  # one writer process
        build_hdf5(cfg, "phase2")
        print(f"pid {os.getpid()} READY", flush=True)
        time.sleep(3)
        t0 = time.perf_counter()
        for _ in range(args.runs):
            shutil.rmtree(cache_folder(cfg.image_root), ignore_errors=True)
            build_hdf5(cfg, "phase2")
        seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "records_per_s": args.runs * args.records / seconds}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
