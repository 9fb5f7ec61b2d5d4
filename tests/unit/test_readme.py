"""README.md: its links into the repository and docs/ resolve, and headings are names.

The docs/ pages themselves are checked by ``make docs`` (``mkdocs build
--strict``); the README is outside that site, so its links are checked here.
"""

from __future__ import annotations

import re
from pathlib import Path

from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _headings(path: Path) -> list[str]:
    return HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8")))


def _anchors(path: Path) -> set[str]:
    return {slugify(heading.replace("`", ""), "-") for heading in _headings(path)}


def test_readme_links_resolve() -> None:
    """Every relative link names an existing file, and every #anchor a heading of its page."""
    readme = ROOT / "README.md"
    links = LINK.findall(FENCE.sub("", readme.read_text(encoding="utf-8")))
    assert links, "no links found: the pattern is wrong"
    broken = []
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        page = readme if not target else ROOT / target
        if not page.exists():
            broken.append(f"{link}: no file {target}")
        elif anchor and anchor not in _anchors(page):
            broken.append(f"{link}: no heading with anchor #{anchor} in {target or 'README.md'}")
    assert not broken, broken


def test_headings_are_names_not_signatures() -> None:
    """A heading with a signature in it changes (and breaks its links) whenever a default does."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    signatures = [f"{page.name}: {heading}" for page in pages for heading in _headings(page)
                  if "(" in heading or "=" in heading]
    assert not signatures, signatures


def test_anchor_check_can_fail() -> None:
    """The anchor rule above matches the headings' real slugs, and rejects a made-up one."""
    anchors = _anchors(ROOT / "docs" / "operations.md")
    assert "the-frameworks-tables" in anchors
    assert "exactlyonce-run" in anchors
    assert "no-such-heading" not in anchors
