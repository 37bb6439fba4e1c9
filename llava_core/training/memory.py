"""The memory plan of a launch: per-process bytes of parameters, gradients, optimizer states and activations.

Parameter counts come from the model configs by arithmetic (`model_inventory` lists every parameter's name and
size as the transformers modules hold them; a test checks it against the model built on torch's meta device), so
the plan needs no torch and allocates nothing: the launcher refuses a run that cannot fit before it starts.
How the states are held and sharded follows the engine of the accelerate config (`LaunchConfig.engine`):

| engine | weights | gradients | optimizer (AdamW) |
|---|---|---|---|
| single, ddp | fp32, whole (autocast computes in bf16) | fp32, whole (+ DDP's fp32 reduction buckets) | fp32 m, v, whole |
| deepspeed-zero1/2/3 | bf16 (fp16), sharded at stage 3 | bf16, sharded from stage 2 | fp32 master + m + v, sharded |
| fsdp-full-shard | fp32 flat shards (+ a gathered bf16 unit) | fp32, sharded | fp32 m, v, sharded |

Activations are an estimate at `max_sequence_length` (the worst case: batches are trimmed to their longest record),
with the SDPA attention transformers uses (no sequence-squared scores), with and without gradient checkpointing.
Module imports are light (yaml and the standard library): the GPU check uses this plan where pydantic is absent.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_core.artifacts import DATA_PARAMS
from llava_core.presets import KNOWN_ARCHITECTURES
from llava_core.training.devices import Gpu, LaunchConfig, LaunchRefused, read_launch_config

if TYPE_CHECKING:
    from llava_core.config import PipelineConfig

GIB = 2**30
HEADROOM = 0.9  # a plan fits when it uses at most this share of a GPU (CUDA context, allocator fragmentation)
CLIP_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
}  # fmt: skip  (transformers' CLIPVisionConfig defaults)
LLAMA_DEFAULTS = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}  # fmt: skip  (LlamaConfig's)


# --- parameters -------------------------------------------------------------------------------------------------
def clip_inventory(v: dict, prefix: str = "image_model.") -> list[tuple[str, int]]:
    """Every parameter of a transformers CLIPVisionModel: (name, number of elements)."""
    v = {**CLIP_DEFAULTS, **v}
    h, i, p, ch = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["num_channels"]
    positions = (v["image_size"] // p) ** 2 + 1
    out = [
        ("embeddings.class_embedding", h),
        ("embeddings.patch_embedding.weight", h * ch * p * p),
        ("embeddings.position_embedding.weight", positions * h),
        ("pre_layrnorm.weight", h),
        ("pre_layrnorm.bias", h),
    ]
    for k in range(v["num_hidden_layers"]):
        layer = f"encoder.layers.{k}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            out += [(f"{layer}self_attn.{proj}.weight", h * h), (f"{layer}self_attn.{proj}.bias", h)]
        out += [(f"{layer}layer_norm1.weight", h), (f"{layer}layer_norm1.bias", h)]
        out += [(f"{layer}mlp.fc1.weight", i * h), (f"{layer}mlp.fc1.bias", i)]
        out += [(f"{layer}mlp.fc2.weight", h * i), (f"{layer}mlp.fc2.bias", h)]
        out += [(f"{layer}layer_norm2.weight", h), (f"{layer}layer_norm2.bias", h)]
    out += [("post_layernorm.weight", h), ("post_layernorm.bias", h)]
    return [(prefix + n, c) for n, c in out]


def llama_dims(t: dict) -> dict:
    t = {**LLAMA_DEFAULTS, **t}
    heads = t["num_attention_heads"]
    kv = t.get("num_key_value_heads") or heads
    head_dim = t.get("head_dim") or t["hidden_size"] // heads
    return {**t, "q_dim": heads * head_dim, "kv_dim": kv * head_dim}


def llama_inventory(t: dict, prefix: str = "text_model.") -> list[tuple[str, int]]:
    """Every parameter of a transformers LlamaForCausalLM."""
    d = llama_dims(t)
    h, i, vocab, q, kv = d["hidden_size"], d["intermediate_size"], d["vocab_size"], d["q_dim"], d["kv_dim"]
    attn_bias, mlp_bias = bool(d.get("attention_bias")), bool(d.get("mlp_bias"))
    out = [("model.embed_tokens.weight", vocab * h)]
    for k in range(d["num_hidden_layers"]):
        layer = f"model.layers.{k}."
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            cols = q if proj == "o_proj" else h
            out.append((f"{layer}self_attn.{proj}.weight", rows * cols))
            if attn_bias:
                out.append((f"{layer}self_attn.{proj}.bias", rows))
        for proj, rows, cols in (("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)):
            out.append((f"{layer}mlp.{proj}.weight", rows * cols))
            if mlp_bias:
                out.append((f"{layer}mlp.{proj}.bias", rows))
        out += [(f"{layer}input_layernorm.weight", h), (f"{layer}post_attention_layernorm.weight", h)]
    out.append(("model.norm.weight", h))
    if not d.get("tie_word_embeddings"):
        out.append(("lm_head.weight", vocab * h))
    return [(prefix + n, c) for n, c in out]


def projector_inventory(vision_hidden: int, text_hidden: int) -> list[tuple[str, int]]:
    v, t = vision_hidden, text_hidden
    return [
        ("projector.0.weight", t * v),
        ("projector.0.bias", t),
        ("projector.2.weight", t * t),
        ("projector.2.bias", t),
    ]


@dataclass(frozen=True)
class Architecture:
    """The towers' config fields (transformers names) and the vocabulary the model is built with."""

    vision: dict
    text: dict

    @property
    def vocab(self) -> int:
        return int(self.text.get("vocab_size", LLAMA_DEFAULTS["vocab_size"]))

    def inventory(self) -> list[tuple[str, int]]:
        """Every parameter of the LlavaModel, in its own order (vision tower, projector, language model)."""
        v = {**CLIP_DEFAULTS, **self.vision}
        t = llama_dims(self.text)
        return clip_inventory(v) + projector_inventory(v["hidden_size"], t["hidden_size"]) + llama_inventory(t)

    @property
    def patches(self) -> int:
        v = {**CLIP_DEFAULTS, **self.vision}
        return (v["image_size"] // v["patch_size"]) ** 2


def count_trainable(arch: Architecture, freeze: list[str], lora: Any = None) -> tuple[int, int]:
    """(total, trainable) parameters after the freeze patterns (and LoRA: base LM frozen, its adapters train)."""
    patterns = [re.compile(p) for p in freeze]
    inv = arch.inventory()
    total = sum(c for _, c in inv)
    trainable = sum(c for n, c in inv if not any(p.search(n) for p in patterns))
    if lora is None:
        return total, trainable
    trainable -= sum(c for n, c in inv if n.startswith("text_model.") and not any(p.search(n) for p in patterns))
    t = llama_dims(arch.text)
    h, i, q, kv = t["hidden_size"], t["intermediate_size"], t["q_dim"], t["kv_dim"]
    shapes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }  # fmt: skip  (in, out)
    adapters = sum(lora.r * sum(shapes[m]) for m in lora.target_modules if m in shapes) * t["num_hidden_layers"]
    return total + adapters, trainable + adapters


def size(n: float) -> str:
    """Bytes as GiB (MiB below one GiB)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


# --- the plan ---------------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Bytes per process (per GPU) of one phase's launch; `total` counts the configured gradient checkpointing."""

    phase: str
    engine: str
    processes: int
    machines: int
    mixed_precision: str
    micro_batch: int
    sequence: int
    gradient_checkpointing: bool
    total_parameters: int
    trainable_parameters: int
    parameters: int
    gradients: int
    optimizer: int
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    notes: list[str] = field(default_factory=list)

    @property
    def activations(self) -> int:
        return (
            self.activations_with_checkpointing
            if self.gradient_checkpointing
            else self.activations_without_checkpointing
        )

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def fits(self, memory_bytes: int) -> bool:
        return self.total <= HEADROOM * memory_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "activations": self.activations, "total": self.total}

    def render(self, gpus: list[Gpu] | None = None) -> str:
        """The plan as text: the `plan` command's output, the refusal's body, the asset's metadata."""
        off = "on" if self.gradient_checkpointing else "off"
        lines = [
            f"memory plan, {self.phase}: {self.engine} over {self.processes} process(es) on {self.machines} "
            f"machine(s), {self.mixed_precision} mixed precision, micro-batch {self.micro_batch} x {self.sequence} "
            "tokens",
            f"parameters: {self.total_parameters:,} ({self.trainable_parameters:,} trainable)",
            "per process:",
            f"  parameters        {size(self.parameters):>12}",
            f"  gradients         {size(self.gradients):>12}",
            f"  optimizer states  {size(self.optimizer):>12}",
            f"  activations       {size(self.activations):>12}   (gradient checkpointing {off}; with: "
            f"{size(self.activations_with_checkpointing)}, without: {size(self.activations_without_checkpointing)})",
            f"  total             {size(self.total):>12}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if gpus:
            smallest = min(gpus, key=lambda g: g.memory_bytes)
            verdict = "fits" if self.fits(smallest.memory_bytes) else "does NOT fit"
            lines.append(
                f"GPUs: {len(gpus)} x {smallest.name} ({smallest.memory_bytes / GIB:.1f} GiB): {verdict} "
                f"({self.total / smallest.memory_bytes:.0%} of one GPU; at most {HEADROOM:.0%} is planned)"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class Workload:
    """What one process computes per micro-batch."""

    micro_batch: int
    sequence: int
    mixed_precision: str
    gradient_checkpointing: bool
    vision_trains: bool
    lm_trains: bool = True


def state_bytes(launch: LaunchConfig, mixed_precision: str, total: int, trainable: int) -> tuple[int, int, int, list]:
    """(parameters, gradients, optimizer) bytes per process, and notes on how they are held."""
    n = max(1, launch.num_processes)
    engine, half = launch.engine, mixed_precision in ("bf16", "fp16")
    if engine.startswith("deepspeed"):
        stage = launch.zero_stage or 0
        w = 2 if half else 4
        params = total * w / (n if stage >= 3 else 1)
        grads = trainable * w / (n if stage >= 2 else 1)
        optim = trainable * (12 if half else 8) / (n if stage >= 1 else 1)
        notes = [
            f"ZeRO-{stage}: {'16-bit' if half else 'fp32'} weights, fp32 master copy + AdamW m, v in the optimizer"
        ]
        return int(params), int(grads), int(optim), notes
    if engine.startswith("fsdp"):
        strategy = launch.fsdp_sharding or "FULL_SHARD"
        shard_params = n if strategy.startswith(("FULL_SHARD", "HYBRID")) else 1
        shard_states = 1 if strategy == "NO_SHARD" else n
        params = total * 4 / shard_params
        notes = [f"FSDP {strategy}: fp32 flat parameters, gathered per unit for compute"]
        return int(params), int(trainable * 4 / shard_states), int(trainable * 8 / shard_states), notes
    grads = trainable * 4 * (2 if engine == "ddp" else 1)
    notes = ["DDP: fp32 gradients and as much again in its reduction buckets"] if engine == "ddp" else []
    return total * 4, grads, trainable * 8, notes


def activation_bytes(arch: Architecture, work: Workload, checkpointing: bool) -> int:
    """The activations one micro-batch keeps for the backward pass, at the peak (estimate; the module docstring)."""
    a = 2 if work.mixed_precision in ("bf16", "fp16") else 4
    t, v = llama_dims(arch.text), {**CLIP_DEFAULTS, **arch.vision}
    h, i, layers, vocab = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], arch.vocab
    tokens = work.micro_batch * work.sequence
    # a decoder layer keeps: 2 norm inputs, q, k, v, the attention output (SDPA's), gate, up and act outputs, and, when
    # its weights train, the inputs of its projections too (the norm outputs, the MLP product)
    per_layer = (2 * h + 2 * t["q_dim"] + 2 * t["kv_dim"] + 3 * i) * a
    if work.lm_trains:
        per_layer += (2 * h + i) * a
    # checkpointing saves each layer's input and recomputes one layer at a time in the backward pass
    lm = (h * a * layers + per_layer) if checkpointing else per_layer * layers
    logits = vocab * (a + 8)  # the logits, their fp32 log-softmax and its gradient
    embeds = 2 * h * a  # token embeddings and the sequence with the image features spliced in
    patches = work.micro_batch * arch.patches
    vh, vi, vlayers = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    projector = patches * (vh + 2 * h) * a
    vtokens = work.micro_batch * (arch.patches + 1)
    if work.vision_trains:
        v_layer = (8 * vh + 2 * vi) * a
        vision = vtokens * ((vh * a * vlayers + v_layer) if checkpointing else v_layer * vlayers)
    else:  # under no_grad: every hidden state is returned (output_hidden_states) and one layer's temporaries
        vision = vtokens * (vh * a * (vlayers + 1) + (8 * vh + 2 * vi) * a)
    return int(tokens * (lm + logits + embeds) + projector + vision)


def plan_memory(
    phase: str,
    arch: Architecture,
    launch: LaunchConfig,
    work: Workload,
    freeze: list[str],
    lora: Any = None,
) -> MemoryPlan:
    """The plan of one launch from the architecture, the accelerate config and the workload."""
    total, trainable = count_trainable(arch, freeze, lora)
    params, grads, optim, notes = state_bytes(launch, work.mixed_precision, total, trainable)
    if launch.engine.startswith(("fsdp", "deepspeed-zero3")):
        largest = max(_layer_sizes(arch))
        params += 2 * largest * 2  # two gathered 16-bit units (the current one and the prefetched next)
    return MemoryPlan(
        phase=phase,
        engine=launch.engine,
        processes=launch.num_processes,
        machines=launch.num_machines,
        mixed_precision=work.mixed_precision,
        micro_batch=work.micro_batch,
        sequence=work.sequence,
        gradient_checkpointing=work.gradient_checkpointing,
        total_parameters=total,
        trainable_parameters=trainable,
        parameters=int(params),
        gradients=grads,
        optimizer=optim,
        activations_without_checkpointing=activation_bytes(arch, work, False),
        activations_with_checkpointing=activation_bytes(arch, work, True),
        notes=notes,
    )


def _layer_sizes(arch: Architecture) -> list[int]:
    sizes: dict[str, int] = {}
    for name, count in arch.inventory():
        m = re.match(r"(.*\.layers\.\d+)\.", name)
        key = m.group(1) if m else name
        sizes[key] = sizes.get(key, 0) + count
    return list(sizes.values())


# --- from a pipeline config -------------------------------------------------------------------------------------
def _tower_config(cfg: PipelineConfig, config: dict | None, pretrained: str | None, tower: str) -> dict:
    """A tower's config fields: given, from its local folder's config.json, or the published architecture."""
    if config is not None:
        return dict(config)
    folder = Path(cfg.resolve_file(pretrained))
    if (folder / "config.json").is_file():
        d = json.loads((folder / "config.json").read_text())
        return dict(d.get("vision_config", d)) if tower == "vision" else d
    if pretrained in KNOWN_ARCHITECTURES:
        return dict(KNOWN_ARCHITECTURES[pretrained])
    raise LaunchRefused(
        f"model.{tower}_pretrained {pretrained!r}: no config.json there and not a known architecture "
        f"({', '.join(KNOWN_ARCHITECTURES)}); the memory plan needs one of them"
    )


def tokenizer_size(folder: str | Path) -> int | None:
    """len(tokenizer) read from tokenizer.json (the largest id of the vocabulary and the added tokens, plus one)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    vocab = d.get("model", {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t["id"] for t in d.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def architecture(cfg: PipelineConfig) -> Architecture:
    """The model the config builds, as `build_model` does: configs, local folders or the published shapes; the
    language model's vocabulary grows to the tokenizer's size."""
    m = cfg.model
    vision = _tower_config(cfg, m.vision_config, m.vision_pretrained, "vision")
    text = _tower_config(cfg, m.text_config, m.text_pretrained, "text")
    size = tokenizer_size(cfg.resolve_file(m.tokenizer))
    if m.text_config is not None and size is not None:
        text["vocab_size"] = size  # build_model: vocab_size=len(tokenizer)
    elif size is not None:
        text["vocab_size"] = max(size, int(text.get("vocab_size", LLAMA_DEFAULTS["vocab_size"])))
    return Architecture(vision, text)


def planned_sequence(cfg: PipelineConfig, phase: str) -> tuple[int, str]:
    """The longest record of the phase's built data (batches are trimmed to their longest record), else
    max_sequence_length (the worst case, before the data exists)."""
    path = cfg.hdf5_dir(phase) / DATA_PARAMS
    if path.is_file():
        longest = json.loads(path.read_text()).get("token_stats", {}).get("sequence_length", {}).get("max")
        if longest:
            return int(longest), f"the longest record of {cfg.rel(cfg.hdf5_dir(phase))}"
    return cfg.hdf5[phase].max_sequence_length, f"hdf5.{phase}.max_sequence_length (no data built yet: the worst case)"


def plan_for(
    cfg: PipelineConfig,
    phase: str,
    num_processes: int | None = None,
    num_machines: int | None = None,
    sequence: int | None = None,
) -> MemoryPlan:
    """The plan of `phase` as the config launches it, here or as its SLURM job (optionally with other process or
    machine counts, or another sequence length than the data's longest record)."""
    tc = cfg.train[phase]
    seq, seq_note = (sequence, "as given") if sequence else planned_sequence(cfg, phase)
    launch = read_launch_config(cfg.resolve_file(tc.accelerate_config))
    if tc.launcher == "slurm":
        num_processes = num_processes or tc.processes(launch.num_processes)
        num_machines = num_machines or tc.slurm.nodes
    launch = launch.with_processes(num_processes, num_machines)
    arch = architecture(cfg)
    frozen = [re.compile(p) for p in tc.freeze]
    vision = [n for n, _ in arch.inventory() if n.startswith("image_model.")]
    lm = [n for n, _ in arch.inventory() if n.startswith("text_model.model.layers.")]
    work = Workload(
        micro_batch=tc.micro_batch_size,
        sequence=seq,
        mixed_precision=tc.mixed_precision,
        gradient_checkpointing=tc.gradient_checkpointing,
        vision_trains=any(not any(p.search(n) for p in frozen) for n in vision),
        lm_trains=tc.lora is not None or any(not any(p.search(n) for p in frozen) for n in lm),
    )
    plan = plan_memory(phase, arch, launch, work, list(tc.freeze), tc.lora)
    plan.notes.append(f"sequence {seq}: {seq_note}")
    return plan


def check_fits(plan: MemoryPlan, gpus: list[Gpu], launch: LaunchConfig) -> None:
    """Refuse a GPU launch whose plan exceeds the smallest visible GPU (the plan is the message)."""
    if not gpus or not launch.uses_gpus:
        return
    smallest = min(gpus, key=lambda g: g.memory_bytes)
    if not plan.fits(smallest.memory_bytes):
        raise LaunchRefused(
            f"accelerate config {launch.path}: {plan.phase} needs about {plan.total / GIB:.1f} GiB per GPU, more than "
            f"{HEADROOM:.0%} of {smallest.name}'s {smallest.memory_bytes / GIB:.1f} GiB. Shard more (FSDP or ZeRO-3), "
            f"turn on gradient checkpointing or lower the micro-batch.\n{plan.render(gpus)}"
        )
