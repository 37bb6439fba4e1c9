"""Measures one training step of a phase on CPU: the peak resident memory it adds, beside the memory plan's estimate.

    python tests/memory_probe.py <params.yaml> <phase> <0|1 gradient checkpointing>   -> one JSON line

Run with MALLOC_MMAP_THRESHOLD_ set low (the test does): glibc then maps every large block on its own and returns it
when freed, so the peak resident size follows the live tensors instead of what the allocator keeps. The step is the
training loop's (forward with the masked loss, backward, AdamW) on a full micro-batch of the longest sequence.
"""

from __future__ import annotations

import json
import sys

import torch

from llava_core.data.tokenizer import load_tokenizer
from llava_core.model.llava import apply_freeze, build_model, enable_gradient_checkpointing
from llava_core.params import load_config
from llava_core.training.memory import plan_for


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def main(params: str, phase: str, checkpointing: bool) -> dict:
    torch.set_num_threads(1)
    cfg = load_config(params, {"train": {phase: {"gradient_checkpointing": checkpointing}}})
    tc, plan = cfg.train[phase], plan_for(cfg, phase)
    tok = load_tokenizer(cfg.resolve_file(cfg.model.tokenizer))
    model = build_model(cfg, len(tok), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    apply_freeze(model, tc.freeze)
    if checkpointing:
        enable_gradient_checkpointing(model)
    b, s, size = tc.micro_batch_size, plan.sequence, cfg.model.image_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tok), (b, s), generator=g)
    pixels = torch.randn(b, 3, size, size, generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current size
        f.write("5")
    _, loss = model(ids, torch.ones_like(ids), pixels, torch.ones(b, dtype=torch.bool), 1,
                    labels=torch.roll(ids, -1, 1), loss_mask=torch.ones_like(ids))  # fmt: skip
    loss.backward()
    opt.step()
    added = status("VmHWM:") - before
    planned = plan.gradients + plan.optimizer + plan.activations  # the parameters were resident before the step
    return {"phase": phase, "checkpointing": checkpointing, "measured": added, "planned": planned,
            "ratio": added / planned, "sequence": s, "micro_batch": b}  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3] == "1")))
