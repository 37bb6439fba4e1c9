"""The locks against the package index: resolve one for a Python on Linux x86-64 without installing, and size it.

    .venv/bin/python scripts/locks.py requirements-cuda.lock --python 3.12    # what it downloads, largest first

`uv pip compile <lock> --python-version X --python-platform x86_64-manylinux_2_28 -o pylock.toml` re-resolves the
lock as the index has it now, for that Python and platform, and writes the chosen files (PEP 751: one wheel or
sdist per package, with its size). The same resolution backs tests/test_install.py: it proves every pin exists
for each supported Python with a wheel (or a known pure-Python sdist) and that the lock is complete.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker

PLATFORM = "x86_64-manylinux_2_28"  # torch 2.13's Linux wheels are manylinux_2_28
PYTHONS = ("3.11", "3.12", "3.13")
# uv options a lock needs on top of the package index: the CPU lock's torch comes from the PyTorch CPU index.
INDEX_OPTIONS = {"requirements-cpu.lock": ["--torch-backend", "cpu"]}
# Settings that would let a machine's own wheel folder or configuration stand in for the index.
LOCAL_SETTINGS = ("UV_FIND_LINKS", "UV_OFFLINE", "UV_NO_INDEX", "UV_CONFIG_FILE")


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    marker: str  # "" when the pin applies everywhere


def read_lock(path: Path) -> list[Pin]:
    """The `name==version ; marker` lines of a requirements lock."""
    pins = []
    for line in Path(path).read_text().splitlines():
        if not line or line[0] in " #-":
            continue
        req, _, marker = line.partition(";")
        name, _, version = req.strip().partition("==")
        pins.append(Pin(name.strip().lower(), version.strip(), marker.strip()))
    return pins


def marker_env(python: str) -> dict[str, str]:
    """PEP 508 marker values of CPython `python` (e.g. "3.12") on Linux x86-64."""
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }


def pins_for(pins: list[Pin], python: str) -> dict[str, str]:
    """{name: version} of the pins that apply to `python` on Linux x86-64."""
    env = marker_env(python)
    return {p.name: p.version for p in pins if not p.marker or Marker(p.marker).evaluate(env)}


def uv_env() -> dict[str, str]:
    """The environment for uv: no local stand-ins for the index, and no interpreter downloads (uv would fetch a
    Python of the requested version to build an sdist's metadata; the running one does)."""
    return {**{k: v for k, v in os.environ.items() if k not in LOCAL_SETTINGS}, "UV_PYTHON_DOWNLOADS": "never"}


def excluded(lock: Path) -> list[str]:
    """The packages pyproject's [tool.uv] leaves out of the main environment's locks (none for the DVC lock)."""
    if Path(lock).name == "requirements-dvc.lock":
        return []
    with open(Path(lock).parent / "pyproject.toml", "rb") as f:
        return tomllib.load(f).get("tool", {}).get("uv", {}).get("exclude-dependencies", [])


def resolve(lock: Path, python: str, extra: list[str] | None = None, uv: str | None = None) -> dict:
    """The lock resolved against the index for `python` (the parsed pylock.toml); raises CalledProcessError with
    uv's message when it does not resolve. No configuration file is read (--no-config): pyproject's exclusions are
    passed explicitly, and nothing else (a machine's find-links) takes part."""
    uv = uv or str(Path(sys.executable).parent / "uv")
    opts = INDEX_OPTIONS.get(Path(lock).name, []) if extra is None else extra
    with tempfile.TemporaryDirectory() as tmp:
        out, excludes = Path(tmp) / "pylock.toml", Path(tmp) / "excludes.txt"
        excludes.write_text("".join(f"{name}\n" for name in excluded(lock)))
        cmd = [uv, "pip", "compile", "-q", "--no-config", str(lock), "--python-version", python]
        cmd += ["--python-platform", PLATFORM, "--excludes", str(excludes), *opts, "-o", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=uv_env())
        return tomllib.loads(out.read_text())


def artifact(package: dict) -> tuple[str, str, int]:
    """("wheel" or "sdist", file name, bytes) of what an install of this pylock package downloads: its most
    specific wheel (a compiled one before a py3-none-any one), else its sdist."""
    wheels = package.get("wheels") or []
    if wheels:
        best = sorted(wheels, key=lambda w: w.get("name", w.get("url", "")).endswith("none-any.whl"))[0]
        url = best.get("url", "")
        size = best.get("size") or (Path(url.removeprefix("file://")).stat().st_size if url.startswith("file:") else 0)
        return "wheel", best.get("name") or url.rsplit("/", 1)[-1], int(size)
    sdist = package["sdist"]
    return "sdist", sdist.get("name") or sdist["url"].rsplit("/", 1)[-1], int(sdist.get("size", 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lock", type=Path)
    ap.add_argument("--python", default="3.11", choices=PYTHONS)
    ap.add_argument("--top", type=int, default=12, help="how many of the largest files to list")
    ap.add_argument("--find-links", help="a wheel folder instead of the lock's own index (torch's CPU build here)")
    args = ap.parse_args(argv)
    try:
        lock = resolve(args.lock, args.python, ["--find-links", args.find_links] if args.find_links else None)
    except subprocess.CalledProcessError as e:
        print(f"{args.lock} does not resolve for Python {args.python}:\n{e.stderr}", file=sys.stderr)
        return 1
    files = sorted(((artifact(p), p["name"]) for p in lock["packages"]), key=lambda x: -x[0][2])
    total = sum(a[2] for a, _ in files)
    print(f"{args.lock} on Python {args.python}, {PLATFORM}: {len(files)} packages, {total / 1e9:.2f} GB to download")
    for (kind, name, size), _ in files[: args.top]:
        print(f"  {size / 1e6:9.1f} MB  {name}{'  (sdist)' if kind == 'sdist' else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
