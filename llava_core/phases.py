"""The two phases of the LLaVA-1.5 recipe and their fixed rules, in one table (docs/stages.md).

Presets add only numbers and paths; what a phase *is* (which phase it continues, what it freezes, how its
conversations are laid out, whether every record needs an image) is said here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    name: str
    previous: str | None  # the phase whose finished weights this one starts from (model state only)
    freeze: tuple[str, ...]  # regex patterns of the parameters that do not train
    prompt_style: str  # the recipe's conversation layout (hdf5.<phase>.prompt_style may override it)
    requires_image: bool  # a record without an image is rejected (counted as `phase1_without_image`)
    description: str


PHASES: dict[str, Phase] = {
    "phase1": Phase(
        "phase1",
        previous=None,
        freeze=("^image_model", "^text_model"),
        prompt_style="plain",
        requires_image=True,
        description="feature alignment: the projector learns to map image features to word embeddings",
    ),
    "phase2": Phase(
        "phase2",
        previous="phase1",
        freeze=("^image_model",),
        prompt_style="vicuna_v1",
        requires_image=False,
        description="visual instruction tuning: the projector and the language model train",
    ),
}
PHASE_NAMES: tuple[str, ...] = tuple(PHASES)
FINAL_PHASE = PHASE_NAMES[-1]  # what export and evaluation read


class UnknownName(KeyError):
    """A phase, source, dataset or other name that does not exist; the message names the valid ones."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def choose(kind: str, name: str, valid) -> str:
    """`name` when it is one of `valid`, else `UnknownName` naming the valid choices."""
    valid = list(valid)
    if name not in valid:
        raise UnknownName(f"unknown {kind} {name!r}; valid: {', '.join(valid) if valid else '(none configured)'}")
    return name


def get_phase(name: str) -> Phase:
    return PHASES[choose("phase", name, PHASE_NAMES)]
