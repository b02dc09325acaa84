"""The worked examples in docstrings (`>>>`) hold: every library module that has one."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for pkg in ("orchestrator", "serving", "workers", "graceful")
    for p in (ROOT / pkg).rglob("*.py")
    if ">>>" in p.read_text()
)


def test_some_modules_have_examples():
    assert "serving.index" in MODULES and "workers.embedding" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
