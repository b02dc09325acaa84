"""User code by import path: the one place graceful imports a model or data factory.

A factory is named `"package.module:callable"` (dots allowed after the colon for an
attribute of an attribute). The string is parsed, never evaluated: the module is imported
with `importlib` from `sys.path` (an installed package, `PYTHONPATH`, or the directories
of the Ray `runtime_env` the operator configured, see `add_import_paths`) and the
attribute is looked up by name.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

# module:attr, each a dotted Python identifier.
FACTORY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
_FACTORY = re.compile(FACTORY_PATTERN)


class FactoryError(ValueError):
    """A factory that cannot be imported or called, or returned something unusable."""


def load_callable(path: str, what: str = "factory") -> Callable[..., Any]:
    """The callable `path` ("module:attr") names. FactoryError, naming `what` and the
    path, when the string is malformed, the module does not import or the attribute is
    missing or not callable."""
    if not isinstance(path, str) or not _FACTORY.match(path):
        raise FactoryError(f"{what} {path!r}: expected 'package.module:callable'")
    module_name, attr = path.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module's own top-level code failing
        raise FactoryError(f"{what} {path!r}: cannot import {module_name!r} "
                           f"({type(e).__name__}: {e}); install it, put it on PYTHONPATH, or ship it "
                           f"with ray.runtime_env (py_modules / working_dir)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FactoryError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryError(f"{what} {path!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def add_import_paths(paths: Iterable[str | Path]) -> list[str]:
    """Put `paths` (directories) at the front of `sys.path` once each; returns those added.

    The driver's counterpart of Ray's `runtime_env`: a `working_dir` is importable as a
    directory of modules, a `py_modules` entry is a package whose parent goes on the path.
    """
    added = []
    for p in paths:
        s = str(Path(p).resolve())
        if s not in sys.path:
            sys.path.insert(0, s)
            added.append(s)
    return added
