"""Every relative link of the README, ``docs/`` and ``benchmark/dcp/`` pages reaches a file, and
every ``#anchor`` a heading of the page it names (GitHub's heading ids)."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PAGES = sorted(
    [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "benchmark" / "dcp").glob("*.md")]
)

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"^(```.*?^```|    .*?)$", re.M | re.S)


def links(page: pathlib.Path):
    """The link targets of ``page``, outside code blocks and inline code."""
    text = re.sub(r"`[^`\n]*`", "", CODE.sub("", page.read_text()))
    return LINK.findall(text)


def heading_ids(page: pathlib.Path):
    """GitHub's ids of ``page``'s headings: lower case, punctuation dropped, spaces to ``-``."""
    ids = set()
    for line in page.read_text().splitlines():
        match = re.match(r"#{1,6} (.*)", line)
        if match:
            title = match.group(1).strip().lower()
            ids.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return ids


def test_heading_ids_follow_github():
    page = REPO / "docs" / "usage.md"
    assert "--dcp-comm-a2a-or-lse" in heading_ids(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in heading_ids(file):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)
