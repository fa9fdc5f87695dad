"""The project's documents: a README short enough to read, links that lead somewhere, and text
about the project only.

Documents: README.md, BENCHMARKS.md and every Markdown file under docs/. Links are checked outside
code (fenced blocks and inline code spans are left out, since commands there are not links).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_WORDS = 3000
DOCUMENTS = sorted([REPO / "README.md", REPO / "BENCHMARKS.md", *(REPO / "docs").glob("*.md")])

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
# Words about how the project was made rather than what it is: work sessions and tracker issue
# numbers ("issue 12", "issues 8 and 12", "issue #7"). Word boundaries keep "tissue" and
# "possession" out; an upstream reference such as "nnU-Net #2407" does not say "issue".
PROCESS_WORDS = re.compile(r"\bsessions?\b|\bissues?\s*#?\s*\d", re.IGNORECASE)


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8")))}


def relative_links(path: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(path.read_text(encoding="utf-8")))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


def test_the_documents_exist():
    names = {p.relative_to(REPO).as_posix() for p in DOCUMENTS}
    expected = {
        "README.md",
        "BENCHMARKS.md",
        "docs/configuration.md",
        "docs/data.md",
        "docs/evaluation.md",
        "docs/reliability.md",
        "docs/architecture.md",
        "docs/gpu-check.md",
    }
    assert expected <= names, sorted(expected - names)


def test_the_readme_is_short_enough_to_read():
    words = len((REPO / "README.md").read_text(encoding="utf-8").split())  # as `wc -w` counts
    assert words <= README_MAX_WORDS, f"README.md has {words} words; move detail into docs/"


def test_the_readme_opens_with_its_contents():
    """Before its first section, the README links to every one of its sections."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    listed = {target for target in LINK.findall(text[: text.index("\n## ")]) if target.startswith("#")}
    sections = {"#" + slug(h) for h in re.findall(r"^## (.+)$", FENCE.sub("", text), re.MULTILINE)}
    assert sections and sections <= listed, sorted(sections - listed)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_leads_to_a_file_and_heading(document: Path):
    broken = []
    for target in relative_links(document):
        file_part, _, anchor = target.partition("#")
        destination = (document.parent / file_part).resolve() if file_part else document
        if not destination.exists():
            broken.append(f"{target}: no file {destination}")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading '{anchor}' in {destination.name}")
    assert not broken, f"{document.name}: " + "; ".join(broken)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_documents_speak_of_the_project_only(document: Path):
    found = [
        f"line {number}: {line.strip()}"
        for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1)
        if PROCESS_WORDS.search(line)
    ]
    assert not found, f"{document.name}: " + "; ".join(found)


def test_the_checks_catch_what_they_are_for(tmp_path: Path):
    """The patterns themselves: they find what they are for and leave ordinary words alone."""
    assert PROCESS_WORDS.search("measured in session 2")
    assert PROCESS_WORDS.search("targets (issues 8 and 12)")
    assert PROCESS_WORDS.search("see issue #7")
    assert not PROCESS_WORDS.search("white-matter tissue 12, possession, nnU-Net #2407")
    assert slug("Which switches of `recipes/fast.yaml` pay: `scripts/bench_ablation.py`") == (
        "which-switches-of-recipesfastyaml-pay-scriptsbench_ablationpy"
    )
    assert slug("Inference (sliding window)") == "inference-sliding-window"
    page = tmp_path / "page.md"
    page.write_text("# A b\n\n[x](#a-b) [y](missing.md) `[z](in-code.md)`\n```\n[w](fenced.md)\n```\n")
    assert relative_links(page) == ["#a-b", "missing.md"]
