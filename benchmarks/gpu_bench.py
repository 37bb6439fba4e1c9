"""GPU throughput of the training step (bf16): tokens/s, MFU and memory, and the LLaVA-1.5-7B phase times it implies.

Measured configurations (random weights, synthetic batches of fixed length; the step is the one the
training loop runs: LlavaModel forward, masked loss, backward, clipping, AdamW):
- `1b`: a 1.1B Llama (TinyLlama shape: hidden 2048, 22 layers, ffn 5632) behind a CLIP ViT-L/14-336 tower,
  phase-2 freezing (projector + LM train);
- `7b_layers_phase1` / `7b_layers_phase2`: Llama-2-7B-shaped decoder layers (hidden 4096, ffn 11008, 32 heads),
  only `--layers` of the 32 so it fits one GPU with full AdamW state, behind the same CLIP tower, with the
  recipe's phase-1 (projector only) and phase-2 (projector + LM) freezing.
The projection divides the 7B recipe's training FLOPs (observe.train_flops over the real 32-layer model:
558K phase-1 samples, 665K phase-2 samples, docs/stages.md, the recipe) by 8 devices x peak x the MFU measured
on the 7B-shaped layers of the same phase, and sets it beside the published 8xA100 times (3.5 h and 10 h),
with the MFU those published times imply on A100 (312 TFLOPs bf16).

    python -m benchmarks.gpu_bench              # on a GPU; writes benchmarks/results/gpu_bench.json
    python -m benchmarks.gpu_bench --smoke      # tiny shapes on CPU: checks the script end to end
    python -m benchmarks.gpu_bench --json PATH [--quick]   # the `make bench` rows (marked not run without a GPU)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.common import figure, gpu_name
from llava_core.presets import CLIP_VIT_L_336 as CLIP_L_336  # the published shapes (llava_core/presets.py)
from llava_core.presets import LLAMA2_7B as LLAMA_7B
from llava_core.presets import LLAMA_1B, PRESETS
from llava_core.training.observe import PEAK_BF16_TFLOPS, flops_model, peak_flops, train_flops

if TYPE_CHECKING:  # torch and the model are imported where a measurement runs (`make bench` without a GPU: never)
    from llava_core.model.llava import LlavaModel

RESULTS = Path(__file__).resolve().parent / "results"

# --smoke: the tiny preset's own towers (llava_core/presets.py), with its tokenizer's vocabulary
_TINY = PRESETS["tiny"]()["model"]
TINY_VISION = _TINY["vision_config"]
TINY_TEXT = {**_TINY["text_config"], "vocab_size": 774}

FREEZE = {"phase1": ["^image_model", "^text_model"], "phase2": ["^image_model"]}
# The LLaVA-1.5-7B recipe (docs/stages.md, the recipe) and what a sample holds. The text lengths are assumptions
# (BLIP captions are short; the 665K mix has multi-turn conversations): change them with the flags.
RECIPE = {
    "phase1": {"samples": 558_128, "global_batch": 256, "published_hours_8xA100": 3.5},
    "phase2": {"samples": 665_298, "global_batch": 128, "published_hours_8xA100": 10.0},
}


@dataclass
class Shape:
    name: str
    vision: dict
    text: dict
    phase: str
    micro_batch: int
    text_tokens: int  # text tokens per sample beside the image slots


def build(vision: dict, text: dict, device: str = "cpu") -> LlavaModel:
    import torch
    from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

    from llava_core.model.llava import LlavaModel

    with torch.device(device):
        return LlavaModel(
            CLIPVisionModel(CLIPVisionConfig(**vision)), AutoModelForCausalLM.from_config(LlamaConfig(**text))
        )


def synthetic_batch(model: LlavaModel, micro: int, text_tokens: int, device) -> dict:
    """[BOS] + image slots + text, every text position supervised (the phase-1 layout)."""
    import torch

    g = torch.Generator().manual_seed(0)
    t = 1 + model.num_patches + text_tokens
    vocab = model.text_model.config.vocab_size
    ids = torch.randint(3, vocab, (micro, t), generator=g)
    loss_mask = torch.zeros(micro, t, dtype=torch.long)
    loss_mask[:, 1 + model.num_patches - 1 :] = 1
    size = model.image_model.config.image_size
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones(micro, t, dtype=torch.long),
        "pixel_values": torch.randn(micro, 3, size, size, generator=g),
        "has_image": torch.ones(micro, dtype=torch.bool),
        "labels": torch.roll(ids, -1, 1),
        "loss_mask": loss_mask,
    }
    return {k: v.to(device) for k, v in batch.items()}


def measure(shape: Shape, device: str, steps: int, warmup: int, checkpointing: bool, peak: float | None) -> dict:
    """Tokens/s, MFU and peak memory of the training step on one device."""
    import torch

    from llava_core.model.llava import apply_freeze, enable_gradient_checkpointing

    torch.manual_seed(0)
    model = build(shape.vision, shape.text, device)
    apply_freeze(model, FREEZE[shape.phase])
    if checkpointing:
        enable_gradient_checkpointing(model)
    fm = flops_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
    batch = synthetic_batch(model, shape.micro_batch, shape.text_tokens, device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    model.train()

    def step() -> float:
        with autocast:
            _, loss = model(
                batch["input_ids"],
                batch["attention_mask"],
                batch["pixel_values"],
                batch["has_image"],
                1,
                labels=batch["labels"],
                loss_mask=batch["loss_mask"],
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    seq = batch["input_ids"].shape[1]
    tokens = steps * shape.micro_batch * seq
    flops = train_flops(fm, tokens, steps * shape.micro_batch, seq)
    out = {
        "name": shape.name,
        "phase": shape.phase,
        "micro_batch": shape.micro_batch,
        "sequence": seq,
        "lm_layers": shape.text["num_hidden_layers"],
        "trainable_parameters": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "gradient_checkpointing": checkpointing,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": steps * shape.micro_batch / seconds,
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "last_loss": loss,
    }
    return out


def recipe_flops(phase: str, vision: dict, text: dict, text_tokens: int) -> tuple[float, int]:
    """Training FLOPs of one epoch of the recipe's phase on the full model (built on the meta device)."""
    from llava_core.model.llava import apply_freeze

    model = build(vision, text, "meta")
    apply_freeze(model, FREEZE[phase])
    r = RECIPE[phase]
    seq = 1 + model.num_patches + text_tokens
    return train_flops(flops_model(model), r["samples"] * seq, r["samples"], seq), seq


def project(
    measured: dict[str, dict],
    vision: dict,
    text: dict,
    text_tokens: dict[str, int],
    peak: float | None,
    devices: int = 8,
) -> dict:
    """Phase times of the 7B recipe on `devices` of this kind at the MFU measured for that phase."""
    out = {}
    for phase, r in RECIPE.items():
        flops, seq = recipe_flops(phase, vision, text, text_tokens[phase])
        mfu = measured[phase]["mfu"]
        a100_mfu = flops / (devices * PEAK_BF16_TFLOPS["A100"] * 1e12 * r["published_hours_8xA100"] * 3600)
        out[phase] = {
            "recipe_flops": flops,
            "sequence": seq,
            "steps": -(-r["samples"] // r["global_batch"]),
            "measured_mfu": mfu,
            "projected_hours": flops / (devices * peak * mfu) / 3600 if (peak and mfu) else None,
            "published_hours_8xA100": r["published_hours_8xA100"],
            "mfu_implied_by_published_time_on_A100": a100_mfu,
        }
    return out


def run(
    smoke: bool = False,
    layers: int = 4,
    micro: int = 8,
    phase1_text: int = 40,
    phase2_text: int = 300,
    checkpointing: bool = False,
    peak_tflops: float | None = None,
    steps: int = 10,
    out_dir: Path = RESULTS,
) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    if device == "cpu" and not smoke:
        raise SystemExit("no GPU: run with --smoke for the CPU check of this script")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_flops(name if device == "cuda" else None, peak_tflops)
    if smoke:
        vision, text7, text1, micro, steps, warmup = TINY_VISION, TINY_TEXT, TINY_TEXT, 2, 2, 1
        phase1_text, phase2_text = 8, 16
        layer_text = TINY_TEXT
    else:
        vision, text7, text1, warmup = CLIP_L_336, LLAMA_7B, LLAMA_1B, 3
        layer_text = {**LLAMA_7B, "num_hidden_layers": layers}
    shapes = [
        Shape("1b", vision, text1, "phase2", micro, phase2_text),
        Shape("7b_layers_phase1", vision, layer_text, "phase1", micro, phase1_text),
        Shape("7b_layers_phase2", vision, layer_text, "phase2", micro, phase2_text),
    ]
    measured = {s.name: measure(s, device, steps, warmup, checkpointing, peak) for s in shapes}
    by_phase = {"phase1": measured["7b_layers_phase1"], "phase2": measured["7b_layers_phase2"]}
    result = {
        "benchmark": "gpu_train_step",
        "smoke": smoke,
        "device": name,
        "peak_tflops": peak / 1e12 if peak else None,
        "torch": torch.__version__,
        "measured": measured,
        "projection_7b_8_devices": project(
            by_phase, vision, text7, {"phase1": phase1_text, "phase2": phase2_text}, peak
        ),
        "assumptions": {
            "phase1_text_tokens": phase1_text,
            "phase2_text_tokens": phase2_text,
            "mfu_from": "the 7B-shaped layers; a full 32-layer model spends a larger share in the LM",
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ("gpu_bench_smoke.json" if smoke else "gpu_bench.json")).write_text(json.dumps(result, indent=2) + "\n")
    return result


TARGET_MFU_1B = 0.40  # on an H100 (the target); reported against the peak of whatever GPU ran it
ROWS = (
    ("1b", "MFU, 1B-class Llama behind CLIP-L/336 (phase 2, bf16)", ("ratio", ">=", TARGET_MFU_1B)),
    ("7b_layers_phase1", "MFU, Llama-2-7B-shaped layers, phase 1 (projector only)", None),
    ("7b_layers_phase2", "MFU, Llama-2-7B-shaped layers, phase 2 (projector + LM)", None),
)


def harness(quick: bool = False) -> dict:
    """The `make bench` rows: on a CUDA GPU the measured MFU (achieved against peak TFLOP/s, with tokens/s and
    memory) and the 7B projection against the published 8xA100 times; without one, the same rows, not run."""
    why = None
    if gpu_name() is None:  # nvidia-smi sees none: no torch import needed to say so
        why = "not run: no CUDA GPU on this machine (run `python -m benchmarks.gpu_bench` on one)"
    else:
        import torch

        if not torch.cuda.is_available():
            why = f"not run: {gpu_name()} present, but torch {torch.__version__} cannot use it"
    if why is not None:
        not_run = [
            figure("gpu", name, "TFLOP/s", None, None, "the GPU's bf16 dense peak", t, why) for _, name, t in ROWS
        ]
        not_run += [
            figure("gpu", f"LLaVA-1.5-7B {p} on 8 GPUs, projected", "h", None, None, "published time on 8xA100",
                   note=why)
            for p in RECIPE
        ]  # fmt: skip
        return {"figures": not_run, "details": {"run": False, "why": why}}
    with tempfile.TemporaryDirectory() as tmp:
        r = run(steps=3 if quick else 10, out_dir=Path(tmp))
    return {"figures": rows(r), "details": {"run": True, **r}}


def rows(r: dict) -> list[dict]:
    """The results-table rows of a `run` result."""
    m, device = r["measured"], r["device"]

    def measured(k: str) -> str:
        mem = m[k]["peak_memory_gib"]
        return (
            f"{m[k]['tokens_per_s']:,.0f} tokens/s, peak memory {f'{mem:.1f} GiB' if mem is not None else 'n/a'}, "
            f"micro-batch {m[k]['micro_batch']} x {m[k]['sequence']}"
        )

    out = [
        figure("gpu", name, "TFLOP/s", m[k]["tflops_per_s"], r["peak_tflops"], f"{device} bf16 dense peak", t,
               note=measured(k))
        for k, name, t in ROWS
    ]  # fmt: skip
    return out + [
        figure("gpu", f"LLaVA-1.5-7B {phase} on 8 GPUs, projected", "h", p["projected_hours"],
               p["published_hours_8xA100"], "published time on 8xA100",
               note=f"8 x {device} at the MFU measured on the 7B-shaped layers ({p['measured_mfu']:.2f}); the "
                    f"published time implies {p['mfu_implied_by_published_time_on_A100']:.2f} on A100")
        for phase, p in r["projection_7b_8_devices"].items()
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="the `make bench` rows, written there")
    ap.add_argument("--quick", action="store_true", help="with --json: fewer steps")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (no GPU needed)")
    ap.add_argument("--layers", type=int, default=4, help="7B-shaped decoder layers to measure (of 32)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--phase1-text-tokens", type=int, default=40)
    ap.add_argument("--phase2-text-tokens", type=int, default=300)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak, for GPUs not in the table")
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    if a.json is not None:
        a.json.write_text(json.dumps(harness(a.quick), indent=2, default=str) + "\n")
        return
    r = run(
        a.smoke,
        a.layers,
        a.micro_batch,
        a.phase1_text_tokens,
        a.phase2_text_tokens,
        a.gradient_checkpointing,
        a.peak_tflops,
        a.steps,
    )
    for m in r["measured"].values():
        mfu = f"{m['mfu']:.3f}" if m["mfu"] is not None else "n/a"
        print(f"{m['name']:18s} {m['tokens_per_s']:10.0f} tok/s  MFU {mfu}  mem {m['peak_memory_gib']} GiB")
    for phase, p in r["projection_7b_8_devices"].items():
        print(
            f"7B {phase}: projected {p['projected_hours']} h on 8 x {r['device']}, "
            f"published {p['published_hours_8xA100']} h on 8 x A100 (implies MFU "
            f"{p['mfu_implied_by_published_time_on_A100']:.2f})"
        )


if __name__ == "__main__":
    main()
