"""The schema's base: the error type, the strict model base, the shared value types and checks."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from llava_core.presets import PRESETS, RESOURCES, resource_path  # noqa: F401  (RESOURCES re-exported)

NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class ConfigError(ValueError):
    """A configuration that cannot be used: every problem found, each as `key.path: message`."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None) -> None:
        self.errors, self.source = errors, source
        lines = [f"{where}: {msg}" if where else msg for where, msg in errors]
        head = f"{source}: " if source else ""
        if len(lines) == 1:
            text = head + lines[0]
        else:
            text = f"{head}{len(lines)} problems\n" + "\n".join(f"  {line}" for line in lines)
        super().__init__(text)


class Schema(BaseModel):
    """Unknown keys are errors; values are coerced where that is unambiguous ("32" -> 32, "2e-5" -> 2e-5)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _check_choice(value: str, valid, what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(sorted(valid))}")
    return value


Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


# "5GB", "500MB", "2GiB" or a number of bytes, as transformers' `max_shard_size` reads them
SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
SIZE_UNITS = {"": 1, "B": 1, **{f"{u}B": 1000 ** (i + 1) for i, u in enumerate("KMGT")}}
SIZE_UNITS.update({f"{u}IB": 1024 ** (i + 1) for i, u in enumerate("KMGT")})


def size_in_bytes(value: int | str) -> int:
    """`5GB` -> 5 * 10**9, `2MiB` -> 2 * 2**20, an int or digits -> itself; ValueError for anything else."""
    m = SIZE_RE.fullmatch(str(value).strip())
    if m is None or isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size: write e.g. 5GB, 500MB, 2GiB or a number of bytes")
    n = int(float(m.group(1)) * SIZE_UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise ValueError(f"{value!r}: a size must be above 0 bytes")
    return n
