"""HDF5 writer throughput against the bare batch tokenisation of the same texts, in 1 and 2 processes.

    python -m benchmarks.bench_hdf5 [--quick] [--json PATH]

Data: the embedded synthetic-shapes generator (no network): `n` multi-turn phase-2 records with 64 px PNGs,
each question and answer made distinct (the generated ones repeat a lot, and the writer tokenises each
distinct text once: on them it would be measured against work it does not do; real instruction data is
mostly distinct). `max_sequence_length` is 512 so that every record is written (at the preset's 288 the
writer would drop most of them as too long, and measure no packing, spooling or shuffling for them).
Figures, all in samples (records) per second, measured in this one run, best of the repeats:
- ceiling: every text piece of the records in one batched call of the fast tokenizer's Rust backend
  (`tokenizers.Tokenizer.encode_batch`, with its default parallelism: all the cores it is given);
- the writer (`build_hdf5`: image checks, tokenisation, packing, the spool, the shuffle into HDF5 shards) with
  `num_workers` 1 and 2, each as a ratio to the ceiling, on a first run: the image checks' cache is emptied
  before each, so every image is decoded;
- scaling: 2 processes on 2 cores against 1 process held to 1 core (`sched_setaffinity`, which the
  tokenizer's threads and the image-check thread inherit), and the 1-core ceiling beside the 1-core writer;
- a second run over the same images (1 process): the cache answers every image check, none is decoded;
- image checks alone, with a full decode and from the cache, to show where the writer's time goes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from benchmarks.common import bench_main, best, figure, rate, tiny_params, write_params

B = "hdf5"


def _distinct(k: int, record: dict) -> dict:
    """Record `k` with every turn made unique: the question names the record, the answer repeats the number."""
    for t, turn in enumerate(record["conversations"]):
        turn["value"] += f" (record {k})" if t % 2 == 0 else f", {k}."
    return record


@contextmanager
def cores(n: int | None):
    """Run the block on the first `n` of this process's CPUs (None: all); processes started inside inherit it."""
    before = os.sched_getaffinity(0)
    if n is not None:
        os.sched_setaffinity(0, sorted(before)[:n])
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _workspace(root: Path, n: int) -> tuple[dict, list[dict]]:
    """The configs of 1 and 2 writer processes over `n` distinct phase-2 records; the records."""
    from llava_core.data.convert import convert
    from llava_core.data.sources import download
    from llava_core.params import load_config

    cfgs = {}
    for w in (1, 2):
        params = tiny_params(
            root,
            {"num_pretrain": 8, "num_instruct": n, "num_eval_images": 2},
            hdf5={"phase2": {"num_workers": w, "max_sequence_length": 512}},
        )
        params["workspace"]["hdf5"] = f"hdf5_w{w}"
        cfgs[w] = load_config(write_params(root / f"params_w{w}.yaml", params))
    cfg = cfgs[1]
    download(cfg, "synthetic_shapes")
    convert(cfg, "shapes_instruct", check_images=False)
    records = [_distinct(k, json.loads(line)) for k, line in enumerate(cfg.jsonl_path("shapes_instruct").open())]
    cfg.jsonl_path("shapes_instruct").write_text("".join(json.dumps(r) + "\n" for r in records))
    return cfgs, records


def run(quick: bool = False) -> dict:
    from llava_core.data.hdf5_writer import build_hdf5
    from llava_core.data.image_cache import ImageCheckCache, cache_folder
    from llava_core.data.images import ImageChecker
    from llava_core.data.prompts import conversation_segments
    from llava_core.data.tokenizer import load_tokenizer

    n = 1000 if quick else 16000
    repeats = 1 if quick else 3
    two_cores = len(os.sched_getaffinity(0)) >= 2
    with tempfile.TemporaryDirectory(prefix="bench_hdf5_") as tmp:
        cfgs, records = _workspace(Path(tmp), n)
        cfg = cfgs[1]
        style = cfg.hdf5["phase2"].prompt_style
        texts = [t for r in records for t in conversation_segments(r["conversations"], style).texts() if t]
        backend = load_tokenizer(cfg.resolve_file(cfg.model.tokenizer)).backend_tokenizer  # the Rust tokenizer

        def ceiling() -> None:
            backend.encode_batch(texts, add_special_tokens=False)

        images = [r["image"] for r in records if "image" in r]
        cache = cache_folder(cfg.image_root)

        def writer(workers: int, first: bool = True) -> float:
            """One whole stage's seconds; a first run's starts with an empty image checks' cache."""
            if first:
                shutil.rmtree(cache, ignore_errors=True)
            results = []
            seconds = best(lambda: results.append(build_hdf5(cfgs[workers], "phase2")), 1)
            decoded["first" if first else "second"].append(results[0].images_decoded)
            return seconds

        def checks(cached: bool) -> float:
            checker = ImageChecker(cfg.image_root, cfg.hdf5["phase2"].min_image_size,
                                   ImageCheckCache(cache) if cached else None)  # fmt: skip
            return best(lambda: checker.check_many(images), 1)

        decoded: dict[str, list[int]] = {"first": [], "second": []}  # images each run decoded
        ceiling()  # warm-up
        writer(1)  # warm-up: imports, tokenizer load, file cache
        # interleaved, so that a busy spell on a shared machine does not fall on one figure only
        keys = ("ceiling", "ceiling_1core", "writer_1", "writer_1_1core", "writer_2", "writer_1_again", "images",
                "images_cached")  # fmt: skip
        s = {k: [] for k in keys}
        for _ in range(repeats):
            s["ceiling"].append(best(ceiling, 1))
            s["writer_1"].append(writer(1))
            s["writer_1_again"].append(writer(1, first=False))
            s["writer_2"].append(writer(2))
            with cores(1):
                s["ceiling_1core"].append(best(ceiling, 1))
                s["writer_1_1core"].append(writer(1))
            s["images"].append(checks(cached=False))
            s["images_cached"].append(checks(cached=True))
    r = {k: rate(n if not k.startswith("images") else len(images), min(v)) for k, v in s.items()}
    return {
        "figures": _figures(r, decoded, two_cores),
        "details": {
            "records": n,
            "text_pieces": len(texts),
            "distinct_text_pieces": len(set(texts)),
            "repeats": repeats,
            "seconds_each": {k: [round(x, 3) for x in v] for k, v in s.items()},
            "samples_per_s": r,
            "images_decoded": decoded,
        },
    }


def _figures(r: dict, decoded: dict, two_cores: bool) -> list[dict]:
    ceiling_name = "ceiling: encode_batch of the same texts, all cores"
    return [
        figure(B, "writer, 1 process (whole stage, first run: every image decoded)", "samples/s", r["writer_1"],
               r["ceiling"], ceiling_name, ("ratio", ">=", 0.8)),
        figure(B, "writer, 2 processes (whole stage, first run)", "samples/s", r["writer_2"], r["ceiling"],
               ceiling_name, ("ratio", ">=", 0.7)),
        figure(B, "scaling: 2 processes on 2 cores vs 1 process on 1 core", "samples/s", r["writer_2"],
               r["writer_1_1core"], "writer, 1 process held to 1 core", ("ratio", ">=", 1.8),
               note="" if two_cores else "fewer than 2 cores: not a scaling figure"),
        figure(B, "writer, 1 process on 1 core", "samples/s", r["writer_1_1core"], r["ceiling_1core"],
               "ceiling on 1 core"),
        figure(B, "writer, 1 process, second run over the same images", "samples/s", r["writer_1_again"],
               r["writer_1"], "the first run"),
        figure(B, "images decoded by a second run over unchanged images", "images", max(decoded["second"]),
               min(decoded["first"]), "images a first run decoded", ("ours", "<=", 0)),
        figure(B, "image checks alone (resolve + full decode)", "samples/s", r["images"], r["ceiling"], ceiling_name),
        figure(B, "image checks alone, from the cache (resolve + SHA-256 + lookup)", "samples/s", r["images_cached"],
               r["images"], "with a full decode"),
    ]  # fmt: skip


if __name__ == "__main__":
    bench_main(run, __doc__)
