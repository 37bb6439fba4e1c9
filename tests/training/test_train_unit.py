"""Training parts without launching a run: accelerate configs, the resumable data order, gradient checkpointing,
LoRA merge, FLOPs, the loss curve files, the observer's files and the resume decision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from llava_core import pipeline
from llava_core.artifacts import RESUME_KEY
from llava_core.atomic import write_json_atomic
from llava_core.config import ConfigError
from llava_core.data.tokenizer import load_tokenizer
from llava_core.model.llava import (
    apply_freeze,
    apply_lora,
    build_model,
    enable_gradient_checkpointing,
    load_model,
    merge_lora,
    save_model,
)
from llava_core.params import load_config
from llava_core.training.checkpointing import ResumeMismatch, find_resume, resume_key
from llava_core.training.dataset import LlavaHdf5Dataset
from llava_core.training.observe import (
    FlopsModel,
    TrainObserver,
    downsample,
    flops_model,
    loss_curve_markdown,
    peak_flops,
    read_metrics,
    summary_metadata,
    train_flops,
    write_loss_curve,
)
from llava_core.training.sampler import DataPosition, EpochBatches, RecordInfo, record_info
from tests.helpers_unit import PROJECT, base_params, write_params

ACCELERATE = PROJECT / "configs" / "accelerate"
EXPECTED_CONFIGS = {
    "cpu.yaml": ("NO", 1),
    "cpu_ddp.yaml": ("MULTI_GPU", 2),
    "single_gpu.yaml": ("NO", 1),
    "multi_gpu.yaml": ("MULTI_GPU", 8),
    "fsdp.yaml": ("FSDP", 8),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8),
    "cpu_multi_node.yaml": ("MULTI_GPU", 2),
    "multi_node.yaml": ("DEEPSPEED", 16),
}


# --- accelerate configs -----------------------------------------------------------------------------------
def test_accelerate_configs_load_and_name_only_launch_options():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    assert {p.name for p in ACCELERATE.glob("*.yaml")} == set(EXPECTED_CONFIGS)
    options = {a.dest for a in launch_command_parser()._actions}
    for name, (kind, processes) in EXPECTED_CONFIGS.items():
        path = ACCELERATE / name
        assert path.read_text().startswith("# "), f"{name} needs its comment header"
        cfg = load_config_from_file(str(path))
        assert (cfg.distributed_type.value, cfg.num_processes) == (kind, processes), name
        for key in cfg.fsdp_config:
            assert key in options, f"{name}: fsdp_config.{key} is no accelerate launch option"
        for key in cfg.deepspeed_config:
            assert key in options, f"{name}: deepspeed_config.{key} is no accelerate launch option"
    assert load_config_from_file(str(ACCELERATE / "deepspeed_zero3.yaml")).deepspeed_config["zero_stage"] == 3
    assert load_config_from_file(str(ACCELERATE / "cpu_ddp.yaml")).use_cpu is True


# --- config -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ({"resume": "sometimes"}, r"train\.phase2\.resume: Input should be 'auto' or 'never' \(got 'sometimes'\)$"),
        ({"keep_last": 0}, r"train\.phase2\.keep_last: Input should be greater than 0 \(got 0\)$"),
        ({"save_every": -1}, r"train\.phase2\.save_every: Input should be greater than or equal to 0 \(got -1\)$"),
        ({"lora": {"r": 0}}, r"train\.phase2\.lora\.r: Input should be greater than 0 \(got 0\)$"),
        ({"lora": {"rank": 4}}, r"train\.phase2\.lora: unknown key 'rank'; valid: r, alpha, dropout, target_modules$"),
    ],
)
def test_bad_training_settings_are_errors(tmp_path, override, message):
    params = write_params(tmp_path, base_params(tmp_path))
    with pytest.raises(ConfigError, match=message):
        load_config(params, {"train": {"phase2": override}})


def test_new_settings_keep_todays_behaviour(tmp_path):
    cfg = load_config(write_params(tmp_path, base_params(tmp_path)))
    tc = cfg.train["phase2"]
    assert (tc.save_every, tc.resume, tc.lora, tc.gradient_checkpointing, tc.group_by_modality_length) == (
        0,
        "auto",
        None,
        False,
        False,
    )
    lora = load_config(write_params(tmp_path, base_params(tmp_path)), {"train": {"phase2": {"lora": {"r": 4}}}})
    assert lora.train["phase2"].lora.r == 4 and lora.train["phase2"].lora.target_modules[0] == "q_proj"


# --- data order -------------------------------------------------------------------------------------------
def _info(n_image: int = 37, n_text: int = 6) -> RecordInfo:
    rng = np.random.default_rng(3)
    has_image = np.array([True] * n_image + [False] * n_text)[rng.permutation(n_image + n_text)]
    return RecordInfo(has_image, rng.integers(10, 200, size=n_image + n_text))


@pytest.mark.parametrize("grouped", [False, True])
def test_each_epoch_is_a_seeded_permutation(grouped):
    info = _info()
    eb = EpochBatches(info, 4, seed=0, group_by_modality_length=grouped)
    for epoch in (0, 1):
        flat = [i for b in eb(epoch) for i in b]
        assert sorted(flat) == list(range(len(info.has_image)))  # every record exactly once
        assert all(len(b) <= 4 for b in eb(epoch))
    assert eb(0) == EpochBatches(info, 4, seed=0, group_by_modality_length=grouped)(0)  # a function of the seed
    assert eb(0) != eb(1)
    assert eb(0) != EpochBatches(info, 4, seed=1, group_by_modality_length=grouped)(0)


def test_grouped_batches_never_mix_modalities_and_sort_by_length():
    info = _info()
    batches = EpochBatches(info, 4, seed=0, group_by_modality_length=True)(0)
    mixed = [b for b in batches if len({bool(info.has_image[i]) for i in b}) > 1]
    assert not mixed
    assert sum(1 for b in batches if not info.has_image[b[0]]) == 2  # 6 text-only records, batches of 4
    for b in batches:
        lengths = [info.length[i] for i in b]
        assert lengths == sorted(lengths, reverse=True)
    # ungrouped batches of the same data do mix them
    plain = EpochBatches(info, 4, seed=0)(0)
    assert any(len({bool(info.has_image[i]) for i in b}) > 1 for b in plain)


def test_ranks_split_the_epoch_evenly():
    info = _info(37, 6)  # 43 records: 11 batches of 4 -> padded to 12 for 3 ranks
    ranks = [EpochBatches(info, 4, seed=0, num_replicas=3, rank=r)(0) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]
    everything = [i for r in ranks for b in r for i in b]
    assert set(everything) == set(range(43))
    single = EpochBatches(info, 4, seed=0)(0)
    assert [b for k in range(4) for b in (ranks[0][k], ranks[1][k], ranks[2][k])][:11] == single  # same global order
    with pytest.raises(ValueError, match="rank 3 outside"):
        EpochBatches(info, 4, seed=0, num_replicas=3, rank=3)


def test_data_position_round_trips():
    pos = DataPosition(epoch=2, offset=5, step=17)
    back = DataPosition()
    back.load_state_dict(pos.state_dict())
    assert back == pos


@pytest.fixture(scope="module")
def small_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_unit")
    cfg = load_config(write_params(root, base_params(root)))
    pipeline.run_download(cfg, "synthetic_shapes")
    for name in cfg.datasets:
        pipeline.run_convert(cfg, name)
    pipeline.run_hdf5(cfg, "phase2")
    return cfg


def test_record_info_matches_the_dataset(small_workspace):
    cfg = small_workspace
    info = record_info(cfg.hdf5_dir("phase2"))
    ds = LlavaHdf5Dataset(cfg.hdf5_dir("phase2"), cfg.image_root, cfg.model.image_size)
    assert len(info.has_image) == len(ds)
    for i in range(len(ds)):
        ex = ds[i]
        assert bool(info.has_image[i]) == bool(ex["has_image"])
        assert int(info.length[i]) == int(ex["attention_mask"].sum())
    cheap = record_info(cfg.hdf5_dir("phase2"), with_lengths=False)  # image paths only
    assert np.array_equal(cheap.has_image, info.has_image) and not cheap.length.any()
    assert (~info.has_image).any() and info.has_image.any()  # both modalities were checked


# --- model: gradient checkpointing, LoRA --------------------------------------------------------------------
def _tiny(cfg):
    tok = load_tokenizer(cfg.resolve_file(cfg.model.tokenizer))
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return build_model(cfg, len(tok), special)


def _batch(model, n: int = 3, t: int = 90):
    g = torch.Generator().manual_seed(0)
    size = model.image_model.config.image_size
    ids = torch.randint(3, 700, (n, t), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "pixel_values": torch.randn(n, 3, size, size, generator=g),
        "has_image": torch.tensor([True, False, True][:n]),
        "labels": torch.roll(ids, -1, 1),
        "loss_mask": torch.ones(n, t, dtype=torch.long),
    }


def _loss(model, b):
    return model(
        b["input_ids"], b["attention_mask"], b["pixel_values"], b["has_image"], 1, b["labels"], b["loss_mask"]
    )[1]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    cfg = load_config(write_params(tmp_path, base_params(tmp_path)))
    grads = []
    for checkpointing in (False, True):
        model = _tiny(cfg)
        apply_freeze(model, ["^image_model", "^text_model"])  # phase 1: gradients cross a frozen LM
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.text_model.model.gradient_checkpointing
        model.train()
        loss = _loss(model, _batch(model))
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert grads[0][1].keys() == grads[1][1].keys() and grads[0][1]
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], rtol=1e-5, atol=1e-7)


def test_lora_trains_adapters_and_projector_and_merges_exactly(tmp_path):
    cfg = load_config(write_params(tmp_path, base_params(tmp_path)))
    model = _tiny(cfg)
    apply_freeze(model, ["^image_model"])  # phase 2
    base_logits = model(**_forward_args(model))[0].detach()
    report = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith("projector.") or "lora_" in n for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 2 * 4  # q and v in each of the 4 layers
    assert report.trainable_prefixes["text_model"] == 4 * 2 * (4 * 128 + 128 * 4)
    model.eval()
    torch.testing.assert_close(model(**_forward_args(model))[0], base_logits)  # B = 0: no change yet
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    adapted = model(**_forward_args(model))[0].detach()
    assert not torch.allclose(adapted, base_logits)
    merge_lora(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(**_forward_args(model))[0], adapted, rtol=1e-5, atol=1e-5)
    save_model(model, tmp_path / "ckpt")
    torch.testing.assert_close(
        load_model(tmp_path / "ckpt").eval()(**_forward_args(model))[0], adapted, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match=r"\['qkv'\] are not modules"):
        apply_lora(_tiny(cfg), r=4, alpha=8, dropout=0.0, target_modules=["qkv"])


def _forward_args(model) -> dict:
    b = _batch(model)
    return {
        "input_ids": b["input_ids"],
        "attention_mask": b["attention_mask"],
        "pixel_values": b["pixel_values"],
        "has_image": b["has_image"],
        "image_start": 1,
    }


# --- FLOPs ------------------------------------------------------------------------------------------------
def test_flops_count_the_tiny_model_by_hand(tmp_path):
    cfg = load_config(write_params(tmp_path, base_params(tmp_path)))
    model = _tiny(cfg)
    apply_freeze(model, ["^image_model", "^text_model"])
    fm = flops_model(model)
    h, ffn, layers, vocab = 128, 344, 4, model.text_model.config.vocab_size
    assert fm.lm_params == layers * (4 * h * h + 3 * h * ffn) + vocab * h  # attention + MLP + head, no table
    assert fm.lm_trainable == 0 and fm.projector_trainable and not fm.vision_trainable
    assert fm.projector_params == 64 * 128 + 128 + 128 * 128 + 128
    assert fm.patches == 64


def test_train_flops_formula():
    fm = FlopsModel(1000, 1000, 2, 8, 500, False, 100, True, 4)
    # LM 6N per token, attention 12 L T d per token, projector 4P per patch, frozen vision 2V per patch+CLS
    assert (
        train_flops(fm, tokens=10, images=2, seq_len=16)
        == 6000 * 10 + 12 * 2 * 16 * 8 * 10 + 4 * 100 * 8 + 2 * 500 * 2 * 5
    )
    frozen_lm = FlopsModel(1000, 0, 2, 8, 500, False, 100, True, 4)
    assert train_flops(fm, 10, 0, 16) - train_flops(frozen_lm, 10, 0, 16) == 2 * 1000 * 10
    assert peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", None) == 312e12
    assert peak_flops(None, None) is None and peak_flops("Some CPU", None) is None
    assert peak_flops(None, 100.0) == 1e14


# --- loss curve and observer --------------------------------------------------------------------------------
RECORDS = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3, "grad_norm": None if s == 1 else 0.5} for s in range(1, 31)]


def test_loss_curve_csv_and_markdown(tmp_path):
    write_loss_curve(RECORDS, tmp_path / "loss_curve.csv")
    lines = (tmp_path / "loss_curve.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,grad_norm" and lines[1] == "1,4.9,0.001," and len(lines) == 31
    picked = downsample(RECORDS, 10)
    assert len(picked) == 10 and picked[0]["step"] == 1 and picked[-1]["step"] == 30
    md = loss_curve_markdown(RECORDS)
    assert md.startswith("loss █") and md.endswith("(4.9000 -> 2.0000 over 30 steps)")


def test_loss_and_score_pictures(tmp_path):
    """The PNGs are what they say: the loss and lr curves of every record, the scores as bars; the same numbers
    give the same bytes (the file is a DVC output inside the checkpoint); the markdown embeds the picture."""
    import base64

    from PIL import Image

    from llava_core.plots import loss_plot, png_markdown, scores_plot

    def pixels_near(path, rgb) -> int:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (512, 256)
            colors = im.convert("RGB").getcolors(1 << 20)
        return sum(n for n, c in colors if max(abs(a - b) for a, b in zip(c, rgb, strict=True)) < 30)

    png = loss_plot(RECORDS, tmp_path / "loss_curve.png", "phase1")
    assert (tmp_path / "loss_curve.png").read_bytes() == png
    # both curves are drawn: the loss in matplotlib's tab:blue, the learning rate in tab:orange
    assert pixels_near(tmp_path / "loss_curve.png", (31, 119, 180)) > 200
    assert pixels_near(tmp_path / "loss_curve.png", (255, 127, 14)) > 200
    assert loss_plot(RECORDS, tmp_path / "again.png", "phase1") == png  # no timestamp in the file
    assert loss_plot(RECORDS[:10], tmp_path / "short.png", "phase1") != png
    by = {
        "color": {"accuracy": 0.75, "metric": "exact_match", "n": 8},
        "exists": {"accuracy": 1.0, "metric": "pope", "n": 4},
    }
    scores = scores_plot(by, tmp_path / "eval_scores.png")
    assert pixels_near(tmp_path / "eval_scores.png", (44, 160, 44)) > 1000  # two tab:green bars
    md = png_markdown(scores, "scores")
    assert md.startswith("![scores](data:image/png;base64,") and base64.b64decode(md[31:-1]) == scores
    meta = summary_metadata({"steps": 30}, RECORDS, tmp_path, png)
    assert meta["loss_plot"] == {"raw_value": png_markdown(png, "loss and learning rate against step"), "type": "md"}
    assert meta["loss_curve"]["raw_value"] == loss_curve_markdown(RECORDS) and meta["steps"] == 30


def live_curve(folder, metric: str) -> list[tuple[int, float]]:
    """DVCLive's plots file of one metric: (step, value) rows."""
    rows = (folder / "dvclive" / "plots" / "metrics" / f"{metric}.tsv").read_text().splitlines()
    assert rows[0] == f"step\t{metric}"  # no timestamp column: the same settings give the same file
    return [(int(s), round(float(v), 4)) for s, v in (r.split("\t") for r in rows[1:])]


def test_observer_writes_metrics_tensorboard_dvclive_and_truncates_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = ["tensorboard", "dvclive"]
    obs = TrainObserver(tmp_path, "phase1", 30, 0, main=True, trackers=trackers, config={"learning_rate": 1e-3})
    assert obs.pipes is None  # not launched by Dagster
    for r in RECORDS[:5]:
        obs.record({**r, "tokens_per_s": 100.0 + r["step"]})
    obs.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert live_curve(tmp_path, "loss") == [(1, 4.9), (2, 4.8), (3, 4.7), (4, 4.6), (5, 4.5)]
    summary = json.loads((tmp_path / "dvclive/metrics.json").read_text())
    assert summary["step"] == 5 and summary["loss"] == pytest.approx(4.5)
    assert "tokens_per_s" not in summary  # this machine's speed stays out of the folder kept in git
    assert yaml.safe_load((tmp_path / "dvclive/params.yaml").read_text()) == {"learning_rate": 1e-3}
    # a resumed run (checkpoint at step 3) drops what the killed run logged after it
    obs = TrainObserver(tmp_path, "phase1", 30, 3, main=True, trackers=trackers)
    obs.record({**RECORDS[3], "loss": 9.0})
    obs.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")][-2:] == [(3, 4.7), (4, 9.0)]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    losses = [(e.step, round(e.value, 4)) for e in acc.Scalars("train/loss")]
    assert losses == [(1, 4.9), (2, 4.8), (3, 4.7), (4, 9.0)]  # purged past the checkpoint, then continued
    assert live_curve(tmp_path, "loss") == losses  # DVCLive: the kept steps logged again, then the new one
    assert not (TrainObserver(tmp_path / "other", "phase1", 3, 0, main=False, trackers=trackers).tb)
    failing = TrainObserver(tmp_path, "phase1", 30, 4, main=True, trackers=["tensorboard"])
    failing.fail(RuntimeError("out of memory"))  # a crashing run still closes (and under Pipes, reports) it all
    assert failing.metrics_f.closed


# --- resume decision --------------------------------------------------------------------------------------
def test_resume_needs_a_checkpoint_and_the_same_settings(tmp_path):
    params = write_params(tmp_path, base_params(tmp_path))
    cfg = load_config(params)
    work = tmp_path / ".phase1.partial"
    key = resume_key(cfg, "phase1", 1)
    assert find_resume(work, key, "auto", "phase1") is None  # nothing there
    (work / "step-00000004").mkdir(parents=True)
    (work / ".step-00000006.tmp").mkdir()  # unfinished: never a resume point
    assert find_resume(work, key, "auto", "phase1") is None  # no key: not a run of this code
    write_json_atomic(work / RESUME_KEY, key)
    assert find_resume(work, key, "auto", "phase1") == work / "step-00000004"
    other = resume_key(load_config(params, {"seed": 1, "train": {"phase1": {"micro_batch_size": 16}}}), "phase1", 1)
    with pytest.raises(ResumeMismatch, match=r"seed, train\.micro_batch_size changed.*resume: never"):
        find_resume(work, other, "auto", "phase1")
    with pytest.raises(ResumeMismatch, match="processes changed"):
        find_resume(work, resume_key(cfg, "phase1", 2), "auto", "phase1")
    assert find_resume(work, other, "never", "phase1") is None
    assert json.loads((work / RESUME_KEY).read_text())["train"]["learning_rate"] == 1e-3
    assert Path(work / "step-00000004").is_dir()


def test_dvc_plots_read_the_loss_curves(tmp_path, venv_env):
    """The project's dvc.yaml `plots:` over the DVCLive folders the observer writes (reports/train/<phase>/) and
    the pictures (png), through real `dvc plots show`."""
    import shutil
    import subprocess

    shutil.copy(PROJECT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    from llava_core.plots import loss_plot, scores_plot

    for phase, records in (("phase1", RECORDS[:4]), ("phase2", RECORDS[:6])):
        (tmp_path / "run" / phase).mkdir(parents=True)
        obs = TrainObserver(tmp_path / "run" / phase, phase, 30, 0, main=True, trackers=["dvclive"])
        for r in records:
            obs.record(r)
        live = obs.end_trackers()
        obs.close()
        (tmp_path / "reports" / "train").mkdir(parents=True, exist_ok=True)
        live.rename(tmp_path / "reports" / "train" / phase)  # where the finished checkpoint's run puts it
        (tmp_path / "checkpoints" / phase).mkdir(parents=True)
        loss_plot(records, tmp_path / "checkpoints" / phase / "loss_curve.png", phase)
    scores_plot({"color": {"accuracy": 0.5, "metric": "exact_match", "n": 2}}, tmp_path / "reports/eval_scores.png")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True, env=venv_env)
    out = subprocess.run(
        ["dvc", "plots", "show", "--json"], cwd=tmp_path, check=True, env=venv_env, capture_output=True, text=True
    ).stdout
    plots = json.loads(out)["data"]
    values = plots["train_loss"][0]["content"]["data"]["values"]
    by_file = {}
    for v in values:
        by_file.setdefault(v["filename"], []).append((int(v["step"]), float(v["loss"])))
    assert {name.split("/")[0]: rows for name, rows in by_file.items()} == {
        "phase1": [(r["step"], r["loss"]) for r in RECORDS[:4]],
        "phase2": [(r["step"], r["loss"]) for r in RECORDS[:6]],
    }, sorted(by_file)
    assert "train_lr" in plots
    # the pictures, as image plots: DVC hands out the files themselves
    for image in ("checkpoints/phase1/loss_curve.png", "checkpoints/phase2/loss_curve.png", "reports/eval_scores.png"):
        (entry,) = plots[image]
        assert entry["type"] == "image" and Path(entry["url"]).read_bytes() == (tmp_path / image).read_bytes()
