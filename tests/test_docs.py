"""The documentation: every local link and image in the READMEs and docs/ points at a file the
repository holds (a clean clone has nothing else: CI runs the suite in one), and a link to a
section names a heading its page has; and no file cites the design by the numbered sections of
the document the project started from, which is not in the repository (cite
``docs/design.md, "<section>"``)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT

#: Built here so that this file does not hold what it looks for.
OLD_CITATION = "DESIGN " + "\N{SECTION SIGN}"
#: Where the project's own text lives: the documentation and the code of every package.
SCANNED = ("README.md", "docs", "study", "analysis", "common", "bench", "tests")
TEXT_SUFFIXES = (".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".cfg")

LINK = re.compile(r"\]\(([^)\s]+)\)")
EXTERNAL = re.compile(r"[a-z][a-z0-9+.-]*:|//")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose(text: str) -> str:
    """The text outside fenced code blocks (a link-like string in code is not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces
    to hyphens."""
    titles = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(text), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", t.lower()).replace(" ", "-") for t in titles}


def broken_links(page: Path) -> list[str]:
    """The page's local links and images whose file, or whose section, does not exist."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if EXTERNAL.match(target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path) if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text()):
            broken.append(target)
    return broken


def test_readme_shows_its_figures():
    targets = LINK.findall((ROOT / "README.md").read_text())
    assert any(t.endswith(".png") and (ROOT / t).exists() for t in targets), "the README shows its figures"


def test_every_local_link_and_image_exists():
    pages = markdown_files()
    assert ROOT / "docs" / "design.md" in pages
    broken = {str(p.relative_to(ROOT)): b for p in pages if (b := broken_links(p))}
    assert not broken, f"links to files or sections the repository lacks: {broken}"


def test_the_design_sections_others_cite_exist():
    anchors = heading_anchors((ROOT / "docs" / "design.md").read_text())
    sections = ("The experiment", "What is recorded", "Layout", "Running", "Results layout",
                "Analysis outputs", "Testing")
    missing = [s for s in sections if s.lower().replace(" ", "-") not in anchors]
    assert not missing, f"docs/design.md lacks the sections {missing}"


def test_no_file_cites_the_design_by_its_old_section_numbers():
    files = []
    for name in SCANNED:
        top = ROOT / name
        files += [top] if top.is_file() else [p for p in sorted(top.rglob("*")) if p.suffix in TEXT_SUFFIXES]
    citing = [str(p.relative_to(ROOT)) for p in files
              if "__pycache__" not in p.parts and OLD_CITATION in p.read_text(errors="replace")]
    assert not citing, f'cite docs/design.md, "<section>" instead of {OLD_CITATION}n in: {citing}'
