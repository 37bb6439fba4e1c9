"""One stage of the growth benchmark in its own process: its code imported first, then the stage alone timed.

    python -m benchmarks.scale_stage <convert|hdf5|validate|loader> <params.yaml> <dataset|phase> <result.json>

The result: the stage's seconds, the records it read, its process's peak resident memory (with the largest child
it waited for), and for the loader the seconds of each of its three steps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

LOADER_BATCHES = 40  # batches the loader step delivers at every size (its cost must not grow with the data)


def _loader(cfg, phase: str, batches: int) -> dict:
    """record_info over every row, the epoch's micro-batches (the sampler), then `batches` of them loaded."""
    from torch.utils.data import DataLoader

    from llava_core.training.dataset import LlavaHdf5Dataset, collate_trimmed
    from llava_core.training.sampler import EpochBatches, record_info

    tc, folder = cfg.train[phase], cfg.hdf5_dir(phase)
    t0 = time.perf_counter()
    info = record_info(folder, with_lengths=tc.group_by_modality_length)
    t1 = time.perf_counter()
    epoch = EpochBatches(info, tc.micro_batch_size, cfg.seed, group_by_modality_length=tc.group_by_modality_length)(0)
    t2 = time.perf_counter()
    dataset = LlavaHdf5Dataset(folder, cfg.image_root, cfg.model.image_size)
    loader = DataLoader(dataset, batch_sampler=epoch[:batches], num_workers=tc.num_workers, collate_fn=collate_trimmed)
    samples = sum(len(b["input_ids"]) for b in loader)
    t3 = time.perf_counter()
    return {
        "records": len(info.has_image),
        "steps": {"record_info": t1 - t0, "sampler": t2 - t1, "batches": t3 - t2},
        "samples": samples,
        "batches": min(batches, len(epoch)),
    }


def run(stage: str, params: Path, key: str) -> dict:
    from llava_core.cli import peak_rss_mib
    from llava_core.params import load_config

    cfg = load_config(params)
    if stage == "convert":
        from llava_core.data.convert import convert

        step = lambda: {"records": convert(cfg, key).read}  # noqa: E731
    elif stage == "hdf5":
        from llava_core.data.hdf5_writer import build_hdf5

        def step() -> dict:
            r = build_hdf5(cfg, key)
            return {"records": r.processed, "steps": r.step_seconds}  # examples (tokenise, spool), shuffle
    elif stage == "validate":
        from llava_core.data.validate import validate_phase

        def step() -> dict:
            r = validate_phase(cfg, key)
            return {"records": r.suites["jsonl"].rows, "examples": r.suites["hdf5"].rows, "success": r.success}

    elif stage == "loader":
        import torch  # noqa: F401  (imported before the clock starts, as a training process has it)

        step = lambda: _loader(cfg, key, LOADER_BATCHES)  # noqa: E731
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    t0 = time.perf_counter()
    result = step()
    result["seconds"] = time.perf_counter() - t0
    result["peak_self_mib"] = peak_rss_mib()
    return result


if __name__ == "__main__":
    stage, params, key, out = sys.argv[1:5]
    Path(out).write_text(json.dumps(run(stage, Path(params), key)) + "\n")
