"""`make setup`: the main virtualenv (the project, torch for the accelerator) and the DVC tool virtualenv.

    python3.12 scripts/setup_env.py --accel cpu [--venv .venv] [--dvc-venv .venv-dvc] [--wheels /opt/wheels]

Standard library only: it runs with the interpreter the environments are made from, before either exists.
- `.venv` gets `requirements-<accel>.lock` (uv pip sync: exactly the lock, nothing left over from another
  accelerator) and the project itself (editable). torch's CPU build comes from a wheel folder when it holds the
  wheel for this Python (this project's machines carry it in /opt/wheels), otherwise from the PyTorch CPU index;
  the CUDA build comes from PyPI. A torch of the other build is replaced (`==2.13.0` accepts `2.13.0+cpu`, so a
  plain sync would keep it).
- `.venv-dvc` gets `requirements-dvc.lock` (DVC, dvc-s3, GTO with hydra's antlr4 4.9), and `.venv/bin/dvc` and
  `.venv/bin/gto` become small scripts that run them with `.venv/bin` first on PATH, so DVC's stage commands
  (`llava-pipeline ...`) run in the main environment.
Every failure the user can act on (a Python outside 3.11-3.13, an unreachable torch index) is one message naming
what is missing and the ways out, not a resolver's output. docs/install.md explains the choices.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

SUPPORTED = ((3, 11), (3, 12), (3, 13))
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TOOLS = ("dvc", "gto")  # commands of the DVC tool environment put on the main environment's PATH
ROOT = Path(__file__).resolve().parent.parent


class SetupError(Exception):
    """A set-up that cannot go on; the message says why and what to do."""


def pinned_uv(root: Path = ROOT) -> str:
    """The uv release pyproject.toml's dev extra pins (the installer of both environments)."""
    with open(root / "pyproject.toml", "rb") as f:
        dev = tomllib.load(f)["project"]["optional-dependencies"]["dev"]
    pins = [d.split("==", 1)[1] for d in dev if d.startswith("uv==")]
    if not pins:
        raise SetupError("pyproject.toml: the dev extra pins no uv (uv==X.Y.Z)")
    return pins[0]


def lock_path(accel: str, root: Path = ROOT) -> Path:
    if accel not in ("cpu", "cuda"):
        raise SetupError(f"ACCEL={accel}: choose cpu, cuda or auto")
    return root / f"requirements-{accel}.lock"


def locked_version(lock: Path, name: str) -> str:
    """The version `lock` pins for `name` (its first line `name==version`, markers ignored)."""
    for line in lock.read_text().splitlines():
        pin = line.split(";")[0].strip()
        if pin.lower().startswith(f"{name.lower()}=="):
            return pin.split("==", 1)[1]
    raise SetupError(f"{lock.name} pins no {name}: run `make lock`")


def python_tag(version: tuple[int, int]) -> str:
    return f"cp{version[0]}{version[1]}"


def local_torch_wheel(wheels: Path | None, version: str, tag: str, machine: str | None = None) -> Path | None:
    """The wheel of torch `version` for this Python and machine in the folder `wheels`, if there is one."""
    if wheels is None or not wheels.is_dir():
        return None
    machine = machine or platform.machine()
    found = sorted(wheels.glob(f"torch-{version}-{tag}-{tag}-*linux*_{machine}.whl"))
    return found[-1] if found else None


def unreachable(url: str, timeout_s: float = 15) -> str | None:
    """None when `url` answers, else the reason it does not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            return None
    except urllib.error.HTTPError as e:
        return None if e.code < 500 else f"HTTP {e.code}"  # an answer, even a 404, means the host is there
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))


def torch_source(
    accel: str, torch: str, wheels: Path | None, version: tuple[int, int], index: str = TORCH_CPU_INDEX
) -> list[str]:
    """uv options that make uv find the locked torch; raises SetupError when it cannot be found."""
    if accel == "cuda":
        return []  # PyPI's plain torch is the CUDA build; a wheel folder holding +cpu builds stays out of it
    tag = python_tag(version)
    if local_torch_wheel(wheels, torch, tag):
        return ["--find-links", str(wheels)]
    reason = unreachable(f"{index}/torch/")
    if reason is None:
        return ["--torch-backend", "cpu"]  # torch (only) from the PyTorch CPU index, the rest from PyPI
    raise SetupError(
        f"ACCEL=cpu on Python {version[0]}.{version[1]} installs torch {torch} from the PyTorch CPU index {index} "
        f"(no torch-{torch}-{tag} wheel in {wheels or 'WHEELS'}), and that index cannot be reached: {reason}.\n"
        "Either let this machine reach the index, put that wheel in a folder and pass WHEELS=<folder>, or choose "
        "ACCEL=cuda (PyPI's CUDA build, a download of about 3 GB: docs/install.md)."
    )


def check_python(version: tuple[int, int], executable: str) -> None:
    if version not in SUPPORTED:
        raise SetupError(
            f"Python {version[0]}.{version[1]} ({executable}): the project supports 3.11, 3.12 and 3.13; "
            "choose one with PY=python3.12 (for example)"
        )


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, **kw)
    print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)


def venv_version(venv: Path) -> tuple[int, int] | None:
    """The Python version of the virtualenv at `venv` (None when there is none)."""
    cfg = venv / "pyvenv.cfg"
    if not (venv / "bin" / "python").exists() or not cfg.is_file():
        return None
    for line in cfg.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() in ("version", "version_info"):
            major, minor = value.strip().split(".")[:2]
            return int(major), int(minor)
    return None


def installed_version(python: Path, name: str) -> str | None:
    code = f"import importlib.metadata as m\ntry: print(m.version({name!r}))\nexcept m.PackageNotFoundError: pass"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return out or None


def ensure_uv(venv: Path, uv_version: str, remake: bool = True) -> Path:
    """The main virtualenv with the pinned uv, made with this interpreter when there is none, and remade when its
    Python differs unless `remake` is False (`make lock` only needs uv, and keeps a virtualenv of another Python)."""
    have = venv_version(venv)
    if have is None or (remake and have != sys.version_info[:2]):
        run([sys.executable, "-m", "venv", "--clear", str(venv)])
    uv = venv / "bin" / "uv"
    current = subprocess.run([str(uv), "--version"], capture_output=True, text=True).stdout if uv.exists() else ""
    if current.split()[1:2] != [uv_version]:
        run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                f"uv=={uv_version}",
            ]
        )
    return uv


def sync_main_command(uv: Path, python: Path, lock: Path, source: list[str]) -> list[str]:
    """`uv pip sync` of the main environment: exactly the lock; a torch of the other build is replaced."""
    torch = locked_version(lock, "torch")
    have = installed_version(python, "torch")
    reinstall = ["--reinstall-package", "torch"] if have not in (None, torch) else []
    return [str(uv), "pip", "sync", "-q", "--compile-bytecode", "--python", str(python), str(lock), *source, *reinstall]


def sync_main(uv: Path, venv: Path, lock: Path, source: list[str], root: Path) -> None:
    python = venv / "bin" / "python"
    # DeepSpeed is an sdist: its build compiles nothing (its ops compile just in time where they are used).
    run(sync_main_command(uv, python, lock, source), env={**os.environ, "DS_BUILD_OPS": "0"})
    run([str(uv), "pip", "install", "-q", "--python", str(python), "--no-deps", "-e", str(root)])
    torch = locked_version(lock, "torch")
    print(f"{venv}: Python {sys.version_info[0]}.{sys.version_info[1]}, {lock.name}, torch {torch}", flush=True)


def sync_dvc(uv: Path, dvc_venv: Path, root: Path) -> None:
    """DVC's own environment; --no-config: pyproject's [tool.uv] settings are the main environment's."""
    if venv_version(dvc_venv) != sys.version_info[:2]:
        run([str(uv), "venv", "-q", "--clear", "--python", sys.executable, str(dvc_venv)])
    python = dvc_venv / "bin" / "python"
    lock = root / "requirements-dvc.lock"
    run([str(uv), "pip", "sync", "-q", "--no-config", "--compile-bytecode", "--python", str(python), str(lock)])


def shim_text(venv: Path, target: Path) -> str:
    return (
        "#!/bin/sh\n"
        f"# `{target.name}` of the DVC tool environment (made by `make setup`: docs/install.md), with this\n"
        "# environment's commands (llava-pipeline, for dvc.yaml's stages) first on PATH.\n"
        f'PATH="{venv.resolve() / "bin"}:$PATH" exec "{target.resolve()}" "$@"\n'
    )


def write_shims(venv: Path, dvc_venv: Path) -> None:
    """`.venv/bin/dvc` and `.venv/bin/gto` run the tool environment's commands (replacing the console scripts the
    dvc library of the main environment brings, which lack hydra)."""
    for name in TOOLS:
        target = dvc_venv / "bin" / name
        if not target.exists():
            raise SetupError(f"{target}: missing after the DVC tool environment was installed")
        shim = venv / "bin" / name
        shim.unlink(missing_ok=True)
        shim.write_text(shim_text(venv, target))
        shim.chmod(0o755)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accel", required=True, help="cpu or cuda (the Makefile resolves auto)")
    ap.add_argument("--venv", type=Path, default=Path(".venv"))
    ap.add_argument("--dvc-venv", type=Path, default=Path(".venv-dvc"))
    ap.add_argument("--wheels", type=Path, default=None, help="a folder of wheels to prefer for torch's CPU build")
    ap.add_argument("--uv-only", action="store_true", help="only the main virtualenv with uv (for `make lock`)")
    ap.add_argument(
        "--stamp", type=Path, help="touched when done; the virtualenv's other stamps (.installed*) go first"
    )
    args = ap.parse_args(argv)
    try:
        version = sys.version_info[:2]
        check_python(version, sys.executable)
        lock = lock_path(args.accel)
        if args.uv_only:
            ensure_uv(args.venv, pinned_uv(), remake=False)
            return 0
        # Where torch comes from is settled before anything is made: an unreachable index leaves nothing half-done.
        source = torch_source(args.accel, locked_version(lock, "torch"), args.wheels, version)
        for old in args.venv.glob(".installed*"):  # from here on the virtualenv is no longer what a stamp says
            old.unlink()
        uv = ensure_uv(args.venv, pinned_uv())
        sync_main(uv, args.venv, lock, source, ROOT)
        sync_dvc(uv, args.dvc_venv, ROOT)
        write_shims(args.venv, args.dvc_venv)
        if args.stamp:
            args.stamp.touch()
    except SetupError as e:
        print(f"make setup: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(
            f"make setup: `{' '.join(map(str, e.cmd))}` failed ({e.returncode}); see its output above", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
