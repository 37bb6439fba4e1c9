"""The code's shape, read from the source with `ast`: imports point one way (orchestration -> assets ->
llava_core) without a cycle, llava_core knows nothing of Dagster or DVC, only public Dagster APIs are used,
and every unit is small enough to read (docs/development.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llava_core.code_deps import Import, import_graph, project_modules
from tests.helpers_unit import PROJECT

PACKAGES = ("llava_core", "assets", "orchestration")
SIZED = (*PACKAGES, "benchmarks", "scripts")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# llava_core may speak the Pipes protocol (the training process reports to Dagster through it) but never
# imports Dagster itself, nor DVC
PIPES = "dagster_pipes"


def cycles(edges: list[Import], known: set[str]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself), sorted."""
    graph: dict[str, set[str]] = {m: set() for m in known}
    for e in edges:
        if e.target in known:
            graph[e.module].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def top(target: str) -> str:
    return target.split(".")[0]


def forbidden_in_llava_core(i: Import) -> bool:
    """Dagster (any dagster* package but the Pipes protocol), DVC (any dvc* package), or the layers above."""
    t = top(i.target)
    return (t.startswith("dagster") and t != PIPES) or t.startswith("dvc") or t in ("assets", "orchestration")


def private_dagster(i: Import) -> bool:
    parts = i.target.split(".")
    if parts[0] != "dagster":
        return False
    return any(p.startswith("_") for p in parts[1:]) or any(n.startswith("_") for n in i.names)


def long_units(root: Path, folders: tuple[str, ...]) -> list[str]:
    """`path: N lines` for every module over the limit, `path:line name: N lines` for every function over it."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(root).as_posix()
            text = path.read_text(encoding="utf-8")
            lines = len(text.splitlines())
            if lines > MAX_MODULE_LINES:
                found.append(f"{rel}: {lines} lines (module)")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        found.append(f"{rel}:{node.lineno} {node.name}: {n} lines (function)")
    return found


def where(edges: list[Import]) -> list[str]:
    return [f"{e.module}:{e.line} imports {e.target}" + (f" ({', '.join(e.names)})" if e.names else "") for e in edges]


# --- the checks on a made-up tree: each finds what it looks for --------------------------------------------
def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_checks_find_cycles_forbidden_imports_and_long_units(tmp_path):
    long_body = "".join(f"    x{k} = {k}\n" for k in range(MAX_FUNCTION_LINES))  # + the def line: one too many
    write_tree(
        tmp_path,
        {
            "core/__init__.py": "",
            "core/a.py": "from core import b\n",  # a -> b at module level
            "core/b.py": "def f():\n    from .a import thing\n",  # b -> a inside a function, relative
            "core/c.py": "import dagster._core.definitions\nfrom dagster import _private\nimport dvc.repo\n",
            "core/d.py": "from dagster_pipes import open_dagster_pipes\nfrom core.sub import e\n",
            "core/sub/__init__.py": "from ..c import x\n",
            "core/sub/e.py": f"def fine():\n    pass\n\n\ndef too_long():\n{long_body}",
            "core/big.py": "x = 1\n" * (MAX_MODULE_LINES + 1),
            "upper/__init__.py": "import core.a\n",
        },
    )
    known = set(project_modules(tmp_path, ("core", "upper")))
    edges = import_graph(tmp_path, ("core", "upper"))
    assert cycles(edges, known) == [["core.a", "core.b"]]
    assert [(e.module, e.target) for e in edges if e.module in ("core.sub", "core.d")] == [
        ("core.d", "dagster_pipes"),
        ("core.d", "core.sub.e"),
        ("core.sub", "core.c"),
    ]
    assert [e.target for e in edges if forbidden_in_llava_core(e)] == [
        "dagster._core.definitions",
        "dagster",
        "dvc.repo",
    ]
    assert [e.target for e in edges if private_dagster(e)] == ["dagster._core.definitions", "dagster"]
    assert long_units(tmp_path, ("core",)) == [
        f"core/big.py: {MAX_MODULE_LINES + 1} lines (module)",
        f"core/sub/e.py:5 too_long: {MAX_FUNCTION_LINES + 1} lines (function)",
    ]
    # a cycle through three modules, one import inside a class body
    write_tree(tmp_path, {"core/b.py": "import core.c\n", "core/c.py": "class K:\n    from core.a import y\n"})
    assert cycles(import_graph(tmp_path, ("core",)), known) == [["core.a", "core.b", "core.c"]]


# --- the project --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> list[Import]:
    return import_graph(PROJECT, PACKAGES)


def test_every_package_is_read(graph):
    modules = {e.module for e in graph}
    for expected in ("llava_core.cli", "llava_core.data.hdf5_writer", "llava_core.training.recipe", "assets.train",
                     "orchestration.definitions", "orchestration.dvc"):  # fmt: skip
        assert expected in modules
    # function-level imports are read too: the pipeline imports its stage modules inside the runners
    assert any(e.module == "llava_core.pipeline" and e.target == "llava_core.training.launch" for e in graph)


def test_no_import_cycle(graph):
    known = set(project_modules(PROJECT, PACKAGES))
    found = cycles(graph, known)
    detail = [where([e for e in graph if e.module in c and e.target in c]) for c in found]
    assert found == [], f"import cycles: {detail}"


def test_llava_core_knows_nothing_of_dagster_or_dvc(graph):
    core = [e for e in graph if top(e.module) == "llava_core"]
    assert where([e for e in core if forbidden_in_llava_core(e)]) == []
    # the one Dagster package it may use: the Pipes protocol, in the training process's observer
    assert {e.module for e in core if top(e.target) == PIPES} == {"llava_core.training.observe"}


def test_assets_never_import_orchestration(graph):
    assert where([e for e in graph if top(e.module) == "assets" and top(e.target) == "orchestration"]) == []


def test_only_public_dagster_apis(graph):
    assert where([e for e in graph if private_dagster(e)]) == []


def test_assets_keep_their_annotations_real():
    """Dagster reads the asset functions' annotations (the context and config types): a string annotation from
    `from __future__ import annotations` hides them."""
    offenders = [
        p.relative_to(PROJECT).as_posix()
        for p in sorted((PROJECT / "assets").glob("*.py"))
        if any(
            isinstance(n, ast.ImportFrom) and n.module == "__future__" and "annotations" in {a.name for a in n.names}
            for n in ast.parse(p.read_text()).body
        )
    ]
    assert offenders == []


def test_units_are_small():
    assert long_units(PROJECT, SIZED) == []
