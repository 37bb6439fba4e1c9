"""Tokens per second of this project's training loop against Hugging Face `Trainer`, same model, data, settings.

Both train phase 2 of the tiny preset (projector + language model) on the same HDF5 data with the same
micro-batch, accumulation, optimizer (AdamW with weight decay groups), warmup + cosine schedule, clipping
and number of optimizer steps, on CPU, in one run. Ours runs as the pipeline runs it (`accelerate launch`,
its own process); `Trainer` runs in this process with the same thread count. Tokens are attended
(non-padding) tokens, counted in the collate function for `Trainer` and by the loop itself for ours; each
side's time is its own training loop (model building and data setup excluded, the first steps included).
The two alternate and each reports its best repeat, since the machine may be shared.

    python -m benchmarks.bench_train [--quick] [--json PATH]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import bench_main, figure, tiny_params, write_params


def _workspace(root: Path, records: int, micro: int, accumulation: int) -> Path:
    """A params file for the tiny preset on `records` generated conversations, everything under `root`."""
    train = {"epochs": 1, "global_batch_size": micro * accumulation, "micro_batch_size": micro}
    params = tiny_params(
        root,
        {"num_pretrain": 16, "num_instruct": records, "num_eval_images": 2},
        {"phase2": {**train, "log_every": 5, "trackers": []}},
    )
    return write_params(root / "params.yaml", params)


def _prepare(params: Path):
    """Data for phase 2 and a phase-1 checkpoint holding the seeded initial weights (speed, not learning)."""
    from llava_core import pipeline
    from llava_core.artifacts import TOKENIZER_DIR, TRAIN_SUMMARY
    from llava_core.atomic import write_json_atomic
    from llava_core.data.tokenizer import load_tokenizer
    from llava_core.model.llava import build_model, save_model
    from llava_core.params import load_config

    cfg = load_config(params)
    pipeline.run_download(cfg, "synthetic_shapes")
    pipeline.run_convert(cfg, "shapes_instruct")
    pipeline.run_hdf5(cfg, "phase2")
    tok = load_tokenizer(cfg.resolve_file(cfg.model.tokenizer))
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    p1 = cfg.checkpoint_dir("phase1")
    save_model(build_model(cfg, len(tok), special), p1)
    tok.save_pretrained(p1 / TOKENIZER_DIR)
    write_json_atomic(p1 / TRAIN_SUMMARY, {"phase": "phase1", "note": "initial weights for the benchmark"})
    return cfg


def _ours(cfg) -> dict:
    from llava_core.training.launch import train

    s = train(cfg, "phase2").summary
    return {
        "tokens_per_s": s["tokens_per_s"],
        "samples_per_s": s["samples_per_s"],
        "steps": s["steps"],
        "seconds": s["seconds"],
        "final_loss": s["final_loss"],
    }


class _LossOnly(torch.nn.Module):
    """`Trainer` calls model(**batch) and reads `loss`: the same LlavaModel forward and masked loss."""

    def __init__(self, model, image_start: int) -> None:
        super().__init__()
        self.model, self.image_start = model, image_start

    def forward(self, input_ids, attention_mask, pixel_values, has_image, labels, loss_mask):
        _, loss = self.model(
            input_ids, attention_mask, pixel_values, has_image, self.image_start, labels=labels, loss_mask=loss_mask
        )
        return {"loss": loss}


def _trainer(cfg, out: Path) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from llava_core.model.llava import apply_freeze, load_model
    from llava_core.training.dataset import LlavaHdf5Dataset, collate_trimmed

    tc = cfg.train["phase2"]
    model = load_model(cfg.checkpoint_dir("phase1"))
    apply_freeze(model, tc.freeze)
    ds = LlavaHdf5Dataset(cfg.hdf5_dir("phase2"), cfg.image_root, cfg.model.image_size)
    counted = {"tokens": 0, "samples": 0}

    def collate(examples):
        batch = collate_trimmed(examples)
        counted["tokens"] += int(batch["attention_mask"].sum())
        counted["samples"] += len(examples)
        return batch

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=tc.micro_batch_size,
        gradient_accumulation_steps=tc.global_batch_size // tc.micro_batch_size,
        num_train_epochs=tc.epochs,
        learning_rate=tc.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=tc.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,
        logging_steps=tc.log_every,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=tc.num_workers,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=cfg.seed,
    )
    span = {}

    class Span(TrainerCallback):
        """The training loop's own time, as ours is measured: from the first step's start (optimizer, model
        wrapping and data loader made) to the end of the last step."""

        def on_train_begin(self, *_args, **_kwargs):
            span["t0"] = time.perf_counter()

        def on_step_end(self, *_args, **_kwargs):
            span["t1"] = time.perf_counter()

    trainer = Trainer(
        model=_LossOnly(model, ds.image_start),
        args=args,
        train_dataset=ds,
        data_collator=collate,
        callbacks=[Span()],
    )
    t0 = time.perf_counter()
    result = trainer.train()
    whole = time.perf_counter() - t0
    seconds = span["t1"] - span["t0"]
    return {
        "tokens_per_s": counted["tokens"] / seconds,
        "samples_per_s": counted["samples"] / seconds,
        "steps": result.global_step,
        "seconds": seconds,
        "seconds_whole_train_call": whole,
        "final_loss": result.training_loss,
    }


def _best(runs: list[dict]) -> dict:
    """The fastest of the repeats: on a shared machine the slower ones measure the neighbours."""
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {**best, "tokens_per_s_each": [r["tokens_per_s"] for r in runs]}


def run(quick: bool = False) -> dict:
    """Both loops on the same data, alternating, best of the repeats: tokens/s and the ratio."""
    # 36 optimizer steps a run, 3 repeats: a run of a few seconds moved 5% between repeats on this machine
    records, micro, accumulation, repeats = (32, 8, 1, 1) if quick else (576, 8, 2, 3)
    ours_runs, their_runs = [], []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        cfg = _prepare(_workspace(root, records, micro, accumulation))
        for k in range(repeats):
            ours_runs.append(_ours(cfg))
            their_runs.append(_trainer(cfg, root / f"hf_trainer_{k}"))
    ours, theirs = _best(ours_runs), _best(their_runs)
    steps = f"{ours['steps']} steps of {micro * accumulation}"
    return {
        "figures": [
            figure(
                "train",
                f"tokens/s, our loop vs HF Trainer (tiny phase 2, CPU, {steps})",
                "tokens/s",
                ours["tokens_per_s"],
                theirs["tokens_per_s"],
                "HF Trainer, same model, data and settings",
                ("ratio", ">=", 1.0),
            )
        ],
        "details": {
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "records": records,
            "micro_batch": micro,
            "accumulation": accumulation,
            "repeats": repeats,
            "ours": ours,
            "hf_trainer": theirs,
            "hf_trainer_optim": "TrainingArguments default",
        },
    }


if __name__ == "__main__":
    bench_main(run, __doc__)
