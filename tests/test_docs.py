"""The documentation: README.md and docs/ link only to what exists, the README stays a short front page, the
generated params reference is current, and no file points at a reference outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llava_core.cli import parser
from llava_core.params import params_reference

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
EXTERNAL = ("http://", "https://", "mailto:")


def prose(text: str) -> str:
    """The markdown without fenced code blocks and code spans (links there are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def relative_links(text: str) -> list[str]:
    return [t for t in LINK.findall(prose(text)) if not t.startswith(EXTERNAL)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation out, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_the_helpers_follow_githubs_rules():
    assert slug("The HDF5 stage and its gate (stage 3)") == "the-hdf5-stage-and-its-gate-stage-3"
    assert slug("What `make demo` gives (measured)") == "what-make-demo-gives-measured"
    assert slug("`train.<phase>.lora`") == "trainphaselora"
    assert slug("Dagster and DVC: lineage, agree?") == "dagster-and-dvc-lineage-agree"
    text = "[a](x.md) `[b](y.md)` ![c](img.png)\n```\n[d](z.md)\n```\n[e](https://example.org) [f](g.md#h)"
    assert relative_links(text) == ["x.md", "img.png", "g.md#h"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path):
    problems = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file} does not exist")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{target}: no heading with the anchor #{anchor} in {file.relative_to(ROOT)}")
        elif anchor and file.suffix != ".md":
            problems.append(f"{target}: an anchor into a file that is not markdown")
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README.read_text())}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_readme_is_a_short_front_page():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES} (move detail to docs/)"


def test_params_reference_is_current():
    assert (DOCS / "params.md").read_text(encoding="utf-8") == params_reference(), (
        "docs/params.md is out of date with the schema: run `llava-pipeline params > docs/params.md`"
    )


def code(text: str) -> str:
    """Only the fenced code blocks and code spans of the markdown (where commands are shown)."""
    return "\n".join([m.group(0) for m in FENCE.finditer(text)] + [m.group(0) for m in CODE_SPAN.finditer(text)])


def test_commands_in_the_readme_exist():
    """Every `llava-pipeline` command and option and every `make` target the README shows is one the project has."""
    shown = code(README.read_text(encoding="utf-8"))
    cli = parser()
    sub = next(a for a in cli._actions if a.dest == "command")
    options = {o for a in cli._actions for o in a.option_strings}
    commands = set(re.findall(r"llava-pipeline(?:\s+(?:--params\s+\S+|-[vq]))*\s+([a-z][a-z0-9-]*)", shown))
    assert {"all", "params", "hdf5", "train", "evaluate"} <= commands
    assert commands - set(sub.choices) == set()
    flags = set(re.findall(r"llava-pipeline\s+(-{1,2}[a-z][a-z-]*)", shown))
    assert {"--version", "--params", "-q", "--help"} <= flags
    assert flags - options == set()
    name = r"[a-z][a-z0-9-]*(?:\.[a-z]+)?"  # a target or a file the Makefile makes (`make dvc.yaml`)
    targets = set(re.findall(rf"^({name}):", (ROOT / "Makefile").read_text(), re.M))
    made = set(re.findall(rf"\bmake ({name})", shown))
    assert {"demo", "test"} <= made
    assert made - targets == set()


OUTSIDE_REFERENCE = "REFERENCE" + ".md"  # spelled in two pieces so that this file does not mention it
CHECKED = ("llava_core", "assets", "orchestration", "benchmarks", "scripts", "tests", "docs")
CHECKED_FILES = ("Makefile", "dvc.yaml", "params.yaml", "README.md")


def test_no_file_points_at_a_reference_outside_the_repository():
    """Comments and docs cite docs/ pages: the formats the code relies on are written down in this repository."""
    files = [ROOT / f for f in CHECKED_FILES]
    for folder in CHECKED:
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    offenders = [
        p.relative_to(ROOT).as_posix()
        for p in files
        if p.suffix not in (".png", ".h5", ".safetensors") and OUTSIDE_REFERENCE in p.read_text(errors="ignore")
    ]
    assert offenders == []
