"""HDF5 stage throughput: the writer against the bare batch tokenisation of the same texts, and the reader.

    python -m benchmarks.bench_hdf5 [--quick]      # writes benchmarks/results/bench_hdf5.json

Data: the embedded synthetic-shapes generator (no network): `n` multi-turn phase-2 records with 64 px images,
each question and answer made distinct (the generated ones repeat a lot, and the writer tokenises each
distinct text once: on them it would be measured against work it does not do; real instruction data is
mostly distinct).
Figures, all in samples (records) per second, measured in this one run:
- ceiling: every text piece the writer tokenises, in one batched call of the fast tokenizer's Rust backend
  (`tokenizers.Tokenizer.encode_batch`; the transformers batch call, with its overhead, is reported too);
- writer with 1 and 2 processes (`hdf5.phase2.num_workers`): the whole stage (image checks with a full
  decode, tokenisation, packing, the shuffle, both HDF5 passes), as ratios to the ceiling, and the scaling;
- image checks alone and one-call-per-text tokenisation, to show where the writer's time goes;
- the reader: random access with image decode and the CLIP transform, directly and through a DataLoader with
  two workers.
`run(quick)` returns the figures (the `make bench` harness calls it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROJECT = Path(__file__).resolve().parents[1]


def _workspace(root: Path, n: int, workers: int):
    """A params file over a generated source of `n` instruct records (written once, shared by the runs)."""
    import yaml

    from llava_core.config import load_config

    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["workspace"]["root"] = str(root)
    params["workspace"]["hdf5"] = f"hdf5_w{workers}"
    params["sources"]["synthetic_shapes"]["options"].update(num_pretrain=8, num_instruct=n, num_eval_images=2)
    params["hdf5"]["phase2"]["num_workers"] = workers
    path = root / f"params_w{workers}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return load_config(path)


def _distinct(k: int, record: dict) -> dict:
    """Record `k` with every turn made unique: the question names the record, the answer repeats the number."""
    for t, turn in enumerate(record["conversations"]):
        turn["value"] += f" (record {k})" if t % 2 == 0 else f", {k}."
    return record


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def _best(fn, repeats: int) -> float:
    """The shortest of `repeats` wall times of fn() (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(quick: bool = False) -> dict:
    from llava_core.convert import convert
    from llava_core.hdf5 import LlavaHdf5Dataset, build_hdf5, collate_trimmed
    from llava_core.images import ImageChecker
    from llava_core.prompts import conversation_segments
    from llava_core.sources import download
    from llava_core.tokenizer import load_tokenizer

    n = 1500 if quick else 8000
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="bench_hdf5_") as tmp:
        root = Path(tmp)
        cfgs = {w: _workspace(root, n, w) for w in (1, 2)}
        cfg = cfgs[1]
        download(cfg, "synthetic_shapes")
        convert(cfg, "shapes_instruct", check_images=False)
        records = [_distinct(k, json.loads(line)) for k, line in enumerate(cfg.jsonl_path("shapes_instruct").open())]
        cfg.jsonl_path("shapes_instruct").write_text("".join(json.dumps(r) + "\n" for r in records))
        style = cfg.hdf5["phase2"].prompt_style
        texts = [t for r in records for t in conversation_segments(r["conversations"], style).texts() if t]
        tok = load_tokenizer(cfg.resolve_file(cfg.model.tokenizer))

        backend = tok.backend_tokenizer  # the Rust tokenizer itself: the barest batched call there is
        backend.encode_batch(texts[:100], add_special_tokens=False)  # warm-up
        ceiling_s = _best(lambda: backend.encode_batch(texts, add_special_tokens=False), repeats)
        transformers_s = _best(lambda: tok(texts, add_special_tokens=False), repeats)
        one_by_one_s = _best(lambda: [tok.encode(t, add_special_tokens=False) for t in texts], 1)
        checker = ImageChecker(cfg.image_root, cfg.hdf5["phase2"].min_image_size)
        images = [r["image"] for r in records if "image" in r]
        images_s = _best(lambda: [checker.check(i) for i in images], repeats)

        build_hdf5(cfgs[1], "phase2")  # warm-up: imports, tokenizer load, file cache
        writer = {w: _best(lambda w=w: build_hdf5(cfgs[w], "phase2"), repeats) for w in (1, 2)}

        ds = LlavaHdf5Dataset(cfg.hdf5_dir("phase2"), cfg.image_root, cfg.model.image_size)
        import torch
        from torch.utils.data import DataLoader

        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
        m = min(len(ds), 1000 if quick else 4000)
        reader_s = _best(lambda: [ds[i] for i in order[:m]], repeats)
        loader = DataLoader(
            torch.utils.data.Subset(ds, order[:m]), batch_size=32, num_workers=2, collate_fn=collate_trimmed
        )
        loader_s = _best(lambda: sum(len(b["input_ids"]) for b in loader), repeats)

    ceiling = _rate(n, ceiling_s)
    w1, w2 = _rate(n, writer[1]), _rate(n, writer[2])
    return {
        "benchmark": "hdf5",
        "quick": quick,
        "records": n,
        "text_pieces": len(texts),
        "distinct_text_pieces": len(set(texts)),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
        },
        "samples_per_s": {
            "ceiling_batch_tokenisation": ceiling,
            "tokenisation_transformers_batch_call": _rate(n, transformers_s),
            "tokenisation_one_call_per_text": _rate(n, one_by_one_s),
            "image_checks_full_decode": _rate(len(images), images_s),
            "writer_1_process": w1,
            "writer_2_processes": w2,
            "reader_random_access_with_images": _rate(m, reader_s),
            "reader_dataloader_2_workers": _rate(m, loader_s),
        },
        "writer_ratio_to_ceiling": {"1_process": round(w1 / ceiling, 3), "2_processes": round(w2 / ceiling, 3)},
        "writer_scaling_1_to_2_processes": round(w2 / w1, 3),
        "target_writer_ratio": 0.7,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small data set and one repetition")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_hdf5.json")
    args = ap.parse_args()
    figures = run(quick=args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
