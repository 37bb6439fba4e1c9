"""benchmarks/gpu_bench.py end to end in its CPU smoke mode, and the 7B FLOPs it projects from."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_bench


def test_gpu_bench_smoke_runs_and_projects_consistently(tmp_path):
    r = gpu_bench.run(smoke=True, peak_tflops=1.0, out_dir=tmp_path)
    assert set(r["measured"]) == {"1b", "7b_layers_phase1", "7b_layers_phase2"}
    for m in r["measured"].values():
        assert m["tokens_per_s"] > 0 and m["peak_memory_gib"] is None  # CPU: no CUDA memory figure
        assert m["mfu"] == pytest.approx(m["tflops_per_s"] / 1.0)
    p1 = r["measured"]["7b_layers_phase1"]
    assert p1["trainable_parameters"] == 64 * 128 + 128 + 128 * 128 + 128  # phase 1: the projector only
    for p in r["projection_7b_8_devices"].values():
        assert p["projected_hours"] == pytest.approx(p["recipe_flops"] / (8 * 1e12 * p["measured_mfu"]) / 3600)
    assert json.loads((tmp_path / "gpu_bench_smoke.json").read_text())["smoke"] is True


def test_7b_recipe_flops_from_the_real_shapes():
    """Vicuna-7B: 6.61B matmul weights (embedding table aside); the published times imply 25-35% MFU on A100."""
    model = gpu_bench.build(gpu_bench.CLIP_L_336, gpu_bench.LLAMA_7B, "meta")
    from llava_core.observe import flops_model

    fm = flops_model(model)
    assert fm.lm_params == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 32000 * 4096
    assert fm.patches == 576
    for phase, seq in (("phase1", 1 + 576 + 40), ("phase2", 1 + 576 + 300)):
        flops, got_seq = gpu_bench.recipe_flops(phase, gpu_bench.CLIP_L_336, gpu_bench.LLAMA_7B, seq - 577)
        assert got_seq == seq
        hours = gpu_bench.RECIPE[phase]["published_hours_8xA100"]
        assert 0.25 < flops / (8 * 312e12 * hours * 3600) < 0.35
