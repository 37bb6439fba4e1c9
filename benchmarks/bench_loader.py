"""The training data loader against what the training step consumes: is the step ever left waiting for data?

    python -m benchmarks.bench_loader [--quick] [--json PATH]

Both sides are the training process's own objects (`llava_core.training.recipe.Recipe` on phase 2 of the tiny preset,
its batch size and its `num_workers`): the loader is `Recipe._loader` over one epoch's batches
(`LlavaHdf5Dataset`: HDF5 rows, image decode, the CLIP "pad" transform; `collate_trimmed`), timed alone; the
step is `Recipe._loss_step` + backward + clipping + AdamW + scheduler on batches already in memory. A ratio
above 1 means the loader delivers samples faster than the step uses them; its inverse is the share of a
step's time spent loading when the loader runs in the training process (`num_workers: 0`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import bench_main, best, figure, rate, tiny_params, write_params


def run(quick: bool = False) -> dict:
    import torch

    from benchmarks.bench_train import _prepare
    from llava_core.training.recipe import Recipe

    records, steps, repeats = (64, 1, 1) if quick else (768, 8, 3)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        root = Path(tmp)
        params = tiny_params(root, {"num_pretrain": 16, "num_instruct": records, "num_eval_images": 2})
        cfg = _prepare(write_params(root / "params.yaml", params))
        recipe = Recipe(cfg, "phase2")
        tc, acc = recipe.tc, recipe.accelerator
        model = recipe._setup_model()
        batches = recipe._setup_data()(0)
        samples = sum(len(b) for b in batches)

        def load_epoch() -> None:
            for _ in recipe._loader(batches):
                pass

        loader_s = best(load_epoch, repeats)
        optimizer, scheduler = recipe._setup_optimizer(model, steps + 1)
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        model.train()
        held = [b for _, b in zip(range(steps + 1), recipe._loader(batches), strict=False)]
        params_ = [p for p in model.parameters() if p.requires_grad]

        def step(batch: dict) -> None:
            loss = recipe._loss_step(model, batch)
            acc.backward(loss)
            acc.clip_grad_norm_(params_, tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        step(held[0])  # warm-up
        timed = held[1:] or held
        t0 = time.perf_counter()
        for b in timed:
            step(b)
        step_s = time.perf_counter() - t0
        step_samples = sum(len(b["input_ids"]) for b in timed)
        threads = torch.get_num_threads()
    loader, consumed = rate(samples, loader_s), rate(step_samples, step_s)
    return {
        "figures": [
            figure(
                "loader",
                f"DataLoader samples/s (image decode, CLIP transform, collate; num_workers={tc.num_workers})",
                "samples/s",
                loader,
                consumed,
                f"training step consumption (tiny phase 2, micro-batch {tc.micro_batch_size})",
                ("ratio", ">", 1.0),
                note=f"loading is {consumed / loader:.0%} of a step's time when it runs in the training process",
            )
        ],
        "details": {
            "records": records,
            "micro_batch": tc.micro_batch_size,
            "num_workers": tc.num_workers,
            "loader_samples": samples,
            "loader_seconds": loader_s,
            "step_samples": step_samples,
            "step_seconds": step_s,
            "torch_threads": threads,
        },
    }


if __name__ == "__main__":
    bench_main(run, __doc__)
