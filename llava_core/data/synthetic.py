"""The embedded default source ("synthetic shapes"): seeded images of coloured shapes in LLaVA source formats.

Writes, into one folder, exactly what a user would download for a real LLaVA run:
- ``pretrain.json``: a LLaVA-Pretrain-style JSON array of caption records (phase 1),
- ``instruct.json``: a LLaVA-Instruct-style JSON array of multi-turn conversations (phase 2),
- ``eval_questions.jsonl``: a held-out ``model_vqa``-style question file with reference answers,
- ``images/`` and ``eval_images/``: the PNG files the records point at (paths relative to the folder).

Every question needs the image: the colour of a named shape, how many shapes, whether a shape or a colour is
there (yes/no, balanced as in POPE) and where a shape is.

The training conversations are built so that a model trained from scratch learns to condition its answer on
the question within a few hundred CPU steps: each one asks about every colour and every shape kind of its
image (several yes and no answers to near-identical questions, so only the key word tells them apart), and the
short-answer instruction follows the first question only, as in LLaVA's multi-turn VQA records.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 180),
}
OUTLINE_COLOR = (20, 20, 20)
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
KINDS = ("color", "count", "exists", "color_exists", "position")  # the question categories
SHORT_ANSWER = "Answer the question using a single word or phrase."
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Give a short description of the picture.",
    "What does this image show?",
    "Summarize the visual content of the image.",
)
TEXT_ONLY_QA = (
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("Which shape has no corners?", "circle"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("Which shape has four equal sides?", "square"),
)


@dataclass(frozen=True)
class ShapesOptions:
    """How much synthetic data to make, and how."""

    seed: int = 0
    image_size: int = 64
    num_pretrain: int = 3000
    num_instruct: int = 3000
    num_eval_images: int = 120
    text_only_fraction: float = 0.03
    shape_fill: float = 0.875  # shape extent as a fraction of its quadrant
    jitter: int = 0  # random offset of a shape inside its quadrant, in pixels (harder when > 0)
    outline: int = 2  # width of the dark contour around each shape, in pixels (0: none)
    kinds_per_conversation: tuple[int, int] = (5, 5)  # (min, max) of the five question kinds a conversation asks
    exhaustive_yes_no: bool = True  # yes/no kinds ask about every colour and shape kind, not one yes and one no
    suffix_every_turn: bool = False  # the short-answer instruction after every question, not the first only
    caption_fraction: float = 0.2  # conversations that also ask for a description of the image

    def __post_init__(self) -> None:
        kinds = tuple(self.kinds_per_conversation)  # a list when it comes from params.yaml
        object.__setattr__(self, "kinds_per_conversation", kinds)
        if len(kinds) != 2 or not 1 <= kinds[0] <= kinds[1] <= len(KINDS):
            raise ValueError(f"kinds_per_conversation must be [min, max] with 1 <= min <= max <= 5, got {list(kinds)}")
        if not 0.0 <= self.caption_fraction <= 1.0:
            raise ValueError(f"caption_fraction must be in [0, 1], got {self.caption_fraction}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        for name in ("num_pretrain", "num_instruct", "num_eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.3 <= self.shape_fill <= 1.0:
            raise ValueError(f"shape_fill must be in [0.3, 1], got {self.shape_fill}")
        if self.jitter < 0 or self.outline < 0:
            raise ValueError(f"jitter and outline must be >= 0, got {self.jitter}, {self.outline}")
        if not 0.0 <= self.text_only_fraction < 1.0:
            raise ValueError(f"text_only_fraction must be in [0, 1), got {self.text_only_fraction}")


@dataclass(frozen=True)
class PlacedShape:
    shape: str
    color: str
    position: str


def sample_scene(rng: random.Random) -> list[PlacedShape]:
    """One to three shapes, each of a distinct kind, colour and grid cell."""
    n = rng.randint(1, 3)
    shapes = rng.sample(SHAPES, n)
    colors = rng.sample(list(COLORS), n)
    positions = rng.sample(POSITIONS, n)
    return [PlacedShape(s, c, p) for s, c, p in zip(shapes, colors, positions, strict=True)]


def render_scene(
    scene: list[PlacedShape], size: int, rng: random.Random, fill: float = 0.875, jitter: int = 0, outline: int = 2
) -> Image.Image:
    """Draw the scene on a light, slightly tinted background; each shape is centred in its quadrant.

    Centred shapes of one size with a dark outline keep each kind's contour on the same patches whatever its
    colour, which is what lets the tiny preset's random, frozen vision tower tell the kinds apart; `jitter`
    moves them and `outline=0` drops the contour, for harder variants.
    """
    bg = tuple(rng.randint(215, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    half = size // 2
    extent = max(4, round(half * fill))
    margin = (half - extent) // 2
    pen = {"outline": OUTLINE_COLOR, "width": outline} if outline else {}
    for item in scene:
        row, col = item.position.split()
        x0 = 0 if col == "left" else half
        y0 = 0 if row == "top" else half
        dx, dy = (rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)) if jitter else (0, 0)
        ox = min(max(x0, x0 + margin + dx), x0 + half - extent)
        oy = min(max(y0, y0 + margin + dy), y0 + half - extent)
        color = COLORS[item.color]
        e, t = extent, extent / 3
        if item.shape == "circle":
            draw.ellipse((ox, oy, ox + e, oy + e), fill=color, **pen)
        elif item.shape == "square":
            draw.rectangle((ox, oy, ox + e, oy + e), fill=color, **pen)
        elif item.shape == "triangle":
            draw.polygon([(ox + e / 2, oy), (ox, oy + e), (ox + e, oy + e)], fill=color, **pen)
        else:  # cross: a plus sign with arms a third of the extent wide
            pts = [
                (t, 0),
                (2 * t, 0),
                (2 * t, t),
                (e, t),
                (e, 2 * t),
                (2 * t, 2 * t),
                (2 * t, e),
                (t, e),
                (t, 2 * t),
                (0, 2 * t),
                (0, t),
                (t, t),
            ]
            draw.polygon([(ox + x, oy + y) for x, y in pts], fill=color, **pen)
    return img


def caption(scene: list[PlacedShape]) -> str:
    parts = [f"a {s.color} {s.shape} at the {s.position}" for s in scene]
    return (parts[0][0].upper() + parts[0][1:] + "".join(f", {p}" for p in parts[1:])) + "."


def shape_question(shape: str) -> str:
    return f"Is there a {shape} in the image?"


def color_question(color: str) -> str:
    return f"Is there a {color} shape in the image?"


def questions_for(scene: list[PlacedShape], rng: random.Random) -> list[tuple[str, str, str]]:
    """The held-out questions of a scene, one per kind, as (category, question, answer).

    The two POPE-style kinds each give one yes and one no per scene: `exists` asks for a shape kind,
    `color_exists` for a shape of a colour.
    """
    target = rng.choice(scene)
    absent = rng.choice([s for s in SHAPES if s not in {p.shape for p in scene}])
    present = rng.choice(scene).shape
    located = rng.choice(scene)
    present_color = rng.choice(scene).color
    absent_color = rng.choice([c for c in COLORS if c not in {p.color for p in scene}])
    return [
        ("color", f"What color is the {target.shape} in the image?", target.color),
        ("count", "How many shapes are there in the image?", str(len(scene))),
        ("exists", shape_question(present), "yes"),
        ("exists", shape_question(absent), "no"),
        ("position", f"Where is the {located.shape} in the image?", located.position),
        ("color_exists", color_question(present_color), "yes"),
        ("color_exists", color_question(absent_color), "no"),
    ]


def every_yes_no(scene: list[PlacedShape]) -> list[tuple[str, str, str]]:
    """Both yes/no kinds asked for every shape kind and every colour (1-3 yes, the rest no)."""
    shapes, colors = {p.shape for p in scene}, {p.color for p in scene}
    return [("exists", shape_question(s), "yes" if s in shapes else "no") for s in SHAPES] + [
        ("color_exists", color_question(c), "yes" if c in colors else "no") for c in COLORS
    ]


def conversation_turns(
    qas: list[tuple[str, str, str]], rng: random.Random, kinds: tuple[int, int] = (5, 5)
) -> list[tuple[str, str, str]]:
    """Between kinds[0] and kinds[1] question kinds for one conversation, each with all its questions, shuffled.

    Asking "is there a red shape?" and "is there a blue shape?" about the same image, with opposite answers,
    is what teaches a model that the answer depends on the question and not only on the image.
    """
    units: dict[str, list[tuple[str, str, str]]] = {}
    for qa in qas:
        units.setdefault(qa[0], []).append(qa)
    chosen = rng.sample(sorted(units), min(len(units), rng.randint(*kinds)))
    turns = [qa for kind in chosen for qa in units[kind]]
    rng.shuffle(turns)
    return turns


def training_conversation(scene: list[PlacedShape], rng: random.Random, options: ShapesOptions) -> list[dict[str, str]]:
    """One LLaVA-Instruct-style multi-turn conversation about a scene (`<image>` in the first turn)."""
    qas = questions_for(scene, rng)
    if options.exhaustive_yes_no:
        qas = [qa for qa in qas if qa[0] not in ("exists", "color_exists")] + every_yes_no(scene)
    conv = []
    for k, (_, q, a) in enumerate(conversation_turns(qas, rng, options.kinds_per_conversation)):
        value = f"{q}\n{SHORT_ANSWER}" if k == 0 or options.suffix_every_turn else q
        conv.append({"from": "human", "value": f"<image>\n{value}" if k == 0 else value})
        conv.append({"from": "gpt", "value": a})
    if rng.random() < options.caption_fraction:  # some conversations also ask for a description
        conv.append({"from": "human", "value": rng.choice(CAPTION_PROMPTS)})
        conv.append({"from": "gpt", "value": caption(scene)})
    return conv


def _save(img: Image.Image, folder: Path, rel: str) -> None:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def generate(folder: Path, options: ShapesOptions) -> dict[str, int]:
    """Write the whole source into ``folder`` (which must exist and be empty or absent). Returns counts."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(options.seed)

    def draw_scene(rel: str) -> list[PlacedShape]:
        """Sample a scene, render it and save it at `rel` (one RNG stream: the same seed, the same files)."""
        scene = sample_scene(rng)
        img = render_scene(scene, options.image_size, rng, options.shape_fill, options.jitter, options.outline)
        _save(img, folder, rel)
        return scene

    pretrain = []
    for i in range(options.num_pretrain):
        rel = f"images/pt_{i:06d}.png"
        scene = draw_scene(rel)
        pretrain.append(
            {
                "id": f"pt_{i:06d}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": f"{rng.choice(CAPTION_PROMPTS)}\n<image>"},
                    {"from": "gpt", "value": caption(scene)},
                ],
            }
        )

    instruct = []
    for i in range(options.num_instruct):
        if rng.random() < options.text_only_fraction:
            q, a = rng.choice(TEXT_ONLY_QA)
            instruct.append(
                {"id": f"it_{i:06d}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            )
            continue
        rel = f"images/it_{i:06d}.png"
        conv = training_conversation(draw_scene(rel), rng, options)
        instruct.append({"id": f"it_{i:06d}", "image": rel, "conversations": conv})

    eval_lines = []
    qid = 0
    for i in range(options.num_eval_images):
        rel = f"eval_images/ev_{i:06d}.png"
        scene = draw_scene(rel)
        for category, q, a in questions_for(scene, rng):
            eval_lines.append({"question_id": qid, "image": rel, "text": q, "answers": [a], "category": category})
            qid += 1

    (folder / "pretrain.json").write_text(json.dumps(pretrain, indent=1))
    (folder / "instruct.json").write_text(json.dumps(instruct, indent=1))
    with open(folder / "eval_questions.jsonl", "w") as f:
        for line in eval_lines:
            f.write(json.dumps(line) + "\n")
    return {"pretrain": len(pretrain), "instruct": len(instruct), "eval_questions": len(eval_lines)}


@dataclass(frozen=True)
class Generator:
    """A `kind: generated` source: its options (a dataclass that checks them) and the function that writes it."""

    options: type
    generate: Callable[[Path, Any], dict[str, int]]


GENERATORS: dict[str, Generator] = {"synthetic_shapes": Generator(ShapesOptions, generate)}
