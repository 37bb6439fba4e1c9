"""The project's import graph, read from the source with `ast`: which modules a module imports, transitively.

Two readers: the code-shape tests (imports point one way, no cycle) and the dvc.yaml generator (`dvc_yaml.py`),
whose code dependencies of a stage are the modules its runner imports, followed through every import of every
module reached (at module level or inside a function or class, as the stage may run any of them).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module, dotted (a project module when `from pkg import submodule`)
    line: int
    names: tuple[str, ...] = ()  # what `from target import ...` takes


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    return {
        module_name(root, p): p
        for package in packages
        for p in sorted((root / package).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def imports_in(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import statement under `tree` (a module, or one function of it), relative ones resolved; `from pkg
    import sub` names the submodule `pkg.sub` when that is a module of the project."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(name, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names = tuple(alias.name for alias in node.names)
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            rest = tuple(n for n in names if f"{base}.{n}" not in known)
            out += [Import(name, sub, node.lineno) for sub in subs]
            if rest or not subs:
                out.append(Import(name, base, node.lineno, rest))
    return out


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    """Every import statement of a module, at module level or inside a function or class."""
    return imports_in(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py", known)


def import_graph(root: Path, packages: tuple[str, ...]) -> list[Import]:
    modules = project_modules(root, packages)
    return [i for name, path in modules.items() for i in imports_of(name, path, set(modules))]


def parents_of(module: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`]: importing a module runs its packages' `__init__` first."""
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def closure(start: set[str], edges: list[Import], known: set[str]) -> set[str]:
    """The project modules reached from `start` (and the packages holding them) through `edges`."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.module, set()).add(e.target)
    seen: set[str] = set()
    todo = [m for m in start if m in known]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [t for t in graph.get(m, set()) | set(parents_of(m)) if t in known and t not in seen]
    return seen


def function_imports(path: Path, module: str, function: str, known: set[str]) -> set[str]:
    """The project modules one top-level function of a module imports in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return {i.target for i in imports_in(node, module, path.name == "__init__.py", known) if i.target in known}
    raise ValueError(f"{path}: no function {function!r}")


def module_level_imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules a module imports at its top level (what importing it runs)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    found = imports_in(ast.Module(body=top, type_ignores=[]), module, path.name == "__init__.py", known)
    return {i.target for i in found if i.target in known}
