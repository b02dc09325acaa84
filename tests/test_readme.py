"""The README is the front page: what and why, the two commands, the demo's output, the
architecture picture, the layout, and a link to every page of docs/ (which hold the rest;
tests/test_docs.py checks every page, the README included, against the code)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAX_BYTES = 15_000


def test_the_two_commands_open_the_readme():
    block = README[README.index("```bash"):README.index("```", README.index("```bash") + 3)]
    commands = [line.split("#")[0].strip() for line in block.splitlines()[1:] if line.strip()]
    assert commands == ["bash scripts/install.sh && .venv/bin/graceful demo", "bash scripts/test.sh"]
    assert (ROOT / "scripts" / "install.sh").is_file() and (ROOT / "scripts" / "test.sh").is_file()


def test_the_readme_is_a_front_page():
    size = len(README.encode())
    assert size < MAX_BYTES, f"README.md is {size} bytes (limit {MAX_BYTES}): move the topic to docs/"
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    assert headings == ["Architecture", "The demo", "Layout", "Documentation"], headings


def test_the_readme_links_every_page_of_docs():
    linked = {Path(t.split("#")[0]).as_posix() for t in re.findall(r"\]\(([^)\s]+)\)", README)}
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert pages, "no docs/*.md"
    assert not pages - linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_the_readme_shows_the_demo_and_its_output():
    start = README.index("$ bash scripts/install.sh && .venv/bin/graceful demo")
    output = README[start:README.index("```", start)]
    for line in ("== g1: rollout", "[g1] promoted", "[g2] rolled_back", "[g2] stage rollout -> rolled_back", "wall time", "summary: runs/demo/summary.json"):
        assert line in output, line
    assert "\n```\n                 config/*.yaml ──validate──▶ RunConfig" in README  # the architecture picture
