"""`make gpu-check`: the acceptance run on one CUDA GPU (at most 8 minutes on an H100/H200), figures in
benchmarks/results/gpu.json.

Both phases of a 1B-class LLaVA (CLIP ViT-L/14-336 + a 1.1B Llama, random init; llava_core/presets.py) train in
bf16 under one GPU (configs/accelerate/single_gpu.yaml), FSDP (fsdp.yaml) and, where DeepSpeed is installed, ZeRO-2
(deepspeed_zero2.yaml), each `accelerate launch`ed with one process: tokens/s, MFU, the peak memory beside the
memory plan's estimate (llava_core/training/memory.py). Then the single-GPU phase-2 model is exported to the
Hugging Face layout (`hf.build_hf_model`, `save_pretrained`), loaded back by transformers, and evaluated: its logits
against the training model's, its greedy answers against the training model's (exact match), answers/s.

It runs where only torch, transformers, accelerate, h5py, peft and safetensors are installed (a GPU machine without
the pipeline's other dependencies): it imports no pydantic, Dagster, DVC or Pillow (tests/test_gpu_check.py runs the
CPU smoke mode with everything else blocked).

    python -m benchmarks.gpu_check            # on a CUDA GPU: benchmarks/results/gpu.json
    python -m benchmarks.gpu_check --smoke    # tiny shapes on CPU (cpu.yaml): checks the script end to end
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.gpu_bench import FREEZE, TINY_TEXT, TINY_VISION, build, synthetic_batch
from llava_core.presets import CLIP_VIT_L_336, LLAMA_1B

PROJECT = Path(__file__).resolve().parents[1]
ACCELERATE = PROJECT / "configs" / "accelerate"
RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = {"single": "single_gpu.yaml", "fsdp": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml"}
SMOKE_ENGINES = {"single": "cpu.yaml"}
PHASES = ("phase1", "phase2")
BUDGET_S = 450  # of the 8 minutes: runs that would start later are skipped (and say so)


def shapes(smoke: bool) -> tuple[dict, dict]:
    return (TINY_VISION, TINY_TEXT) if smoke else (CLIP_VIT_L_336, LLAMA_1B)


# --- one launch: a phase under one accelerate config (this module as the training process) --------------------------
def train_worker(a: argparse.Namespace) -> dict:
    """A few training steps of one phase under the launching accelerate config: throughput, MFU, peak memory, plan."""
    import torch
    from accelerate import Accelerator

    from llava_core.model.llava import apply_freeze, save_model
    from llava_core.training.devices import read_launch_config, set_deepspeed_micro_batch
    from llava_core.training.memory import Architecture, Workload, plan_memory
    from llava_core.training.observe import flops_model, peak_flops, train_flops

    cuda = torch.cuda.is_available()
    acc = Accelerator(mixed_precision="bf16" if cuda else "no")
    set_deepspeed_micro_batch(acc, a.micro_batch)
    vision, text = shapes(a.smoke)
    torch.manual_seed(0)
    model = build(vision, text, str(acc.device))
    report = apply_freeze(model, FREEZE[a.phase])
    fm = flops_model(model)
    batch = synthetic_batch(model, a.micro_batch, a.text_tokens, acc.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model, opt = acc.prepare(model, opt)

    def step() -> float:
        with acc.autocast():
            _, loss = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["has_image"], 1,
                            labels=batch["labels"], loss_mask=batch["loss_mask"])  # fmt: skip
        acc.backward(loss)
        acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [step() for _ in range(a.steps)]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    seq = batch["input_ids"].shape[1]
    tokens = a.steps * a.micro_batch * seq
    flops = train_flops(fm, tokens, a.steps * a.micro_batch, seq)
    name = torch.cuda.get_device_name() if cuda else None
    peak = peak_flops(name, None)
    launch = read_launch_config(a.config).with_processes(acc.num_processes)
    work = Workload(a.micro_batch, seq, "bf16" if cuda else "no", False, False)
    plan = plan_memory(a.phase, Architecture(vision, {**text}), launch, work, FREEZE[a.phase])
    measured = torch.cuda.max_memory_allocated() if cuda else None
    if a.save and acc.is_main_process:
        save_model(acc.unwrap_model(model), Path(a.save))
    return {
        "engine": a.engine,
        "phase": a.phase,
        "device": name or "cpu",
        "micro_batch": a.micro_batch,
        "sequence": seq,
        "trainable_parameters": report.trainable,
        "total_parameters": report.trainable + report.frozen,
        "tokens_per_s": tokens / seconds,
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / peak if peak else None,
        "peak_memory_gib": measured / 2**30 if measured is not None else None,
        "plan_gib": plan.total / 2**30,
        "peak_over_plan": measured / plan.total if measured is not None else None,
        "losses": losses,
    }


# --- export and evaluation -------------------------------------------------------------------------------------------
def export_and_evaluate(model_dir: Path, out_dir: Path, smoke: bool, questions: int = 16, new_tokens: int = 8) -> dict:
    """The trained model -> the HF layout on disk -> loaded back by transformers; logits and greedy answers compared."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from llava_core.evaluation.metrics import exact_match
    from llava_core.model.hf import build_hf_model
    from llava_core.model.llava import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(model_dir).to(device, dtype).eval()
    image_token = model.text_model.config.vocab_size - 1  # any id: the export records which one marks images
    t0 = time.perf_counter()
    build_hf_model(model, image_token).save_pretrained(out_dir, safe_serialization=True)
    export_s = time.perf_counter() - t0
    hf = LlavaForConditionalGeneration.from_pretrained(out_dir, dtype=dtype).to(device).eval()
    g = torch.Generator().manual_seed(1)
    p, vocab, size = model.num_patches, image_token, model.image_model.config.image_size
    text = torch.randint(3, vocab, (questions, 12), generator=g)
    ids = torch.cat([torch.ones(questions, 1, dtype=torch.long), torch.full((questions, p), image_token), text], 1)
    ids, pixels = ids.to(device), torch.randn(questions, 3, size, size, generator=g).to(device, dtype)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model(ids, mask, pixels, torch.ones(questions, dtype=torch.bool, device=device), 1)[0]
        theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        t0 = time.perf_counter()
        answers = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=new_tokens,
                              do_sample=False)[:, ids.shape[1]:]  # fmt: skip
        gen_s = time.perf_counter() - t0
    reference = ours[:, -1].argmax(-1)  # the training model's first greedy token
    agree = [exact_match(str(a), [str(r)]) for a, r in zip(answers[:, 0].tolist(), reference.tolist(), strict=True)]
    return {
        "export_seconds": export_s,
        "hf_parameters": sum(x.numel() for x in hf.parameters()),
        "logits_max_abs_diff": float((ours.float() - theirs.float()).abs().max()),
        "first_token_exact_match": sum(agree) / len(agree),
        "answers_per_s": questions / gen_s,
        "questions": questions,
        "max_new_tokens": new_tokens,
    }


# --- the run ---------------------------------------------------------------------------------------------------------
def launch_worker(engine: str, config: Path, phase: str, a: argparse.Namespace, tmp: Path, save: Path | None) -> dict:
    """`accelerate launch` of one phase under one config (one process), its result read back."""
    out = tmp / f"{engine}-{phase}.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
           "-m", "benchmarks.gpu_check", "--worker", "--engine", engine, "--phase", phase, "--config", str(config),
           "--micro-batch", str(a.micro_batch), "--text-tokens", str(a.text_tokens), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--result", str(out)]  # fmt: skip
    cmd += (["--smoke"] if a.smoke else []) + (["--save", str(save)] if save else [])
    proc = subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, timeout=a.budget_s)
    if proc.returncode != 0:
        return {"engine": engine, "phase": phase, "error": proc.stderr[-4000:]}
    return json.loads(out.read_text())


def run(a: argparse.Namespace) -> dict:
    import torch

    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --smoke for the CPU check of this script")
    engines = SMOKE_ENGINES if a.smoke else ENGINES
    t_start, runs, skipped = time.monotonic(), [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for engine, name in engines.items():
            if engine == "zero2" and importlib.util.find_spec("deepspeed") is None:
                skipped.append(
                    {"engine": engine, "why": "DeepSpeed is not installed (make setup ACCEL=cuda brings it)"}
                )
                continue
            for phase in PHASES:
                if time.monotonic() - t_start > a.budget_s:
                    skipped.append({"engine": engine, "phase": phase, "why": f"past the {a.budget_s} s budget"})
                    continue
                save = tmp / "model" if (engine == "single" and phase == "phase2") else None
                runs.append(launch_worker(engine, ACCELERATE / name, phase, a, tmp, save))
        model = tmp / "model"
        evaluation = export_and_evaluate(model, tmp / "hf", a.smoke) if model.is_dir() else {"error": "no model"}
    return {
        "check": "gpu_check",
        "smoke": a.smoke,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not a.smoke else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": "CLIP ViT-L/14-336 + 1.1B Llama (random init)" if not a.smoke else "the tiny preset's towers",
        "runs": runs,
        "skipped": skipped,
        "export_and_evaluation": evaluation,
        "seconds": time.monotonic() - t_start,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (no GPU needed)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/gpu.json (gpu_smoke.json)")
    ap.add_argument("--micro-batch", type=int, default=None, help="default 8 (2 with --smoke)")
    ap.add_argument("--text-tokens", type=int, default=None, help="text tokens beside the image; default 300 (16)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps; default 10 (2)")
    ap.add_argument("--warmup", type=int, default=None, help="default 3 (1)")
    ap.add_argument("--budget-s", type=int, default=BUDGET_S)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--engine", "--phase", "--config", "--result", "--save"):
        ap.add_argument(name, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for key, full, smoke in (("micro_batch", 8, 2), ("text_tokens", 300, 16), ("steps", 10, 2), ("warmup", 3, 1)):
        if getattr(a, key) is None:
            setattr(a, key, smoke if a.smoke else full)
    if a.worker:
        result = train_worker(a)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(a.result).write_text(json.dumps(result))
        return 0
    result = run(a)
    out = a.out or RESULTS / ("gpu_smoke.json" if a.smoke else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["runs"]:
        if "error" in r:
            print(f"{r['engine']:6s} {r['phase']}: FAILED\n{r['error']}")
            continue
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.1f} GiB (plan {r['plan_gib']:.1f})" if r["peak_memory_gib"] else "n/a"
        print(f"{r['engine']:6s} {r['phase']}: {r['tokens_per_s']:10.0f} tok/s  MFU {mfu}  peak {mem}")
    print(f"export and evaluation: {result['export_and_evaluation']}")
    print(f"written to {out} ({result['seconds']:.0f} s)")
    return 1 if any("error" in r for r in result["runs"]) or "error" in result["export_and_evaluation"] else 0


if __name__ == "__main__":
    sys.exit(main())
