"""The docs (README.md and docs/*.md) refer only to things that exist.

Checked over every file, prose and code alike, and failing with one line per offender
(`file:line: what: why`):

- relative markdown links point at files of the repository (and, for `file.md#anchor`,
  at a heading of that file);
- repository paths in code (`orchestrator/...`, `deploy/...`, ...) exist;
- `graceful <command>` is a subcommand of the CLI parser, and the `--options` written
  after it are options of that command; `python -m benchmarks.X` / `python
  benchmarks/X.py` scripts exist and define the options written after them;
- dotted Python references (`workers.train.make_extra_loss`, `orchestrator.apps:router_app`,
  `from serving.client import RouterClient`) name a module of the repository and a name
  it defines;
- HTTP routes (`POST /v1/admin/alert`) are routes of the router or the controller;
- config keys in backticks (`rollout.max_source_errors`, `generations[].compat`) and the
  keys of the tables marked `<!-- config-keys: PREFIX -->` (PREFIX `.` for top-level
  keys) resolve in the pydantic models of the run config, those tables' `default` column
  matches the models' defaults, and every `rollout.` and `gates.` key has a row;
- metric names (`ray_graceful_*`, `graceful_*`) are exported by a `metric_names.py`
  module, and every exported name is documented in docs/metrics.md;
- nothing in the repository cites a file that lives outside it.

Unit test only: nothing here starts Ray; the modules named in the docs are read with `ast`,
not imported (only the CLI parser, the config models and the metric-name lists are).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
TOP_DIRS = ("orchestrator", "workers", "serving", "config", "deploy", "benchmarks", "tests", "scripts", "docs")
PACKAGES = ("orchestrator", "workers", "serving", "benchmarks", "tests")


# --- reading the docs ----------------------------------------------------------------------

@dataclass(frozen=True)
class Snippet:
    """A piece of a doc: an inline code span, a code-block line, or a prose paragraph."""

    path: Path
    line: int  # 1-based line of the snippet's start
    text: str
    kind: str  # "span", "block" or "prose"
    lang: str = ""  # a fenced block's language

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


SPAN = re.compile(r"`([^`]+)`")


def snippets(path: Path) -> list[Snippet]:
    out: list[Snippet] = []
    lines = path.read_text().splitlines()
    fence: Optional[str] = None
    lang = ""
    para: list[tuple[int, str]] = []
    prev_blank, prev_indented = True, False

    def flush() -> None:
        if not para:
            return
        start = para[0][0]
        text = "\n".join(t for _, t in para)
        out.append(Snippet(path, start, text, "prose"))
        for m in SPAN.finditer(text):
            out.append(Snippet(path, start + text.count("\n", 0, m.start()), m.group(1).replace("\n", " "), "span"))
        para.clear()

    for i, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            else:
                out.append(Snippet(path, i, line, "block", lang))
            prev_blank = False
            continue
        m = re.match(r"\s*(```+|~~~+)(.*)", line)
        if m:
            flush()
            fence, lang = m.group(1), m.group(2).strip()
            continue
        if not stripped:
            flush()
            prev_blank, prev_indented = True, False
            continue
        if line.startswith(("    ", "\t")) and (prev_blank or prev_indented):
            flush()
            out.append(Snippet(path, i, line, "block"))
            prev_blank, prev_indented = False, True
            continue
        para.append((i, line))
        prev_blank, prev_indented = False, False
    flush()
    return out


@lru_cache(maxsize=None)
def all_snippets() -> tuple[Snippet, ...]:
    return tuple(s for p in DOCS for s in snippets(p))


def code() -> Iterator[Snippet]:
    """Inline spans and code-block lines of every doc."""
    return (s for s in all_snippets() if s.kind in ("span", "block"))


def blank_spans(text: str) -> str:
    """Prose with its code spans blanked out, newlines kept (offsets -> lines stay right)."""
    return SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def line_of(s: Snippet, text: str, offset: int) -> str:
    return f"{s.path.relative_to(ROOT)}:{s.line + text.count(chr(10), 0, offset)}"


def report(offenders: list[str], what: str) -> None:
    assert not offenders, f"{len(offenders)} {what}:\n  " + "\n  ".join(offenders)


def test_the_docs_exist():
    names = {p.name for p in DOCS}
    assert "README.md" in names and len(DOCS) > 5, names


# --- (a) links -----------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def github_slugs(path: Path) -> set[str]:
    """Anchors GitHub gives the headings of a markdown file."""
    seen: dict[str, int] = {}
    slugs: set[str] = set()
    fence = False
    for line in path.read_text().splitlines():
        if re.match(r"\s*(```|~~~)", line):
            fence = not fence
            continue
        m = None if fence else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


def test_relative_links_point_at_files_and_headings():
    offenders = []
    checked = 0
    for s in all_snippets():
        if s.kind != "prose":
            continue
        prose = blank_spans(s.text)
        for m in LINK.finditer(prose):
            target = m.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            checked += 1
            file_part, _, anchor = target.partition("#")
            dest = (s.path.parent / file_part).resolve() if file_part else s.path
            where = line_of(s, prose, m.start())
            if not dest.exists():
                offenders.append(f"{where}: link ({target}): no file {file_part}")
            elif anchor and dest.suffix == ".md" and anchor not in github_slugs(dest):
                offenders.append(f"{where}: link ({target}): no heading with anchor #{anchor} "
                                 f"in {dest.relative_to(ROOT)}")
    report(offenders, "broken links")
    assert checked > 10, "found almost no links: is the link pattern still right?"


# --- (b) repository paths ------------------------------------------------------------------

PATH = re.compile(r"(?<![\w./~$-])((?:%s)/[\w./*<>-]*)" % "|".join(TOP_DIRS))


def path_exists(rel: str) -> bool:
    rel = re.sub(r"<[^>]*>", "*", rel).rstrip(".,:;")
    if any(c in rel for c in "*?["):
        return any(ROOT.glob(rel.rstrip("/")))
    p = ROOT / rel
    return p.exists() or (not rel.endswith("/") and p.with_name(p.name + ".py").exists())


def test_repository_paths_in_code_exist():
    offenders = []
    for s in code():
        for m in PATH.finditer(s.text):
            if not path_exists(m.group(1)):
                offenders.append(f"{s.where()}: path `{m.group(1)}` does not exist")
    report(offenders, "paths that are not in the repository")


# --- (c) commands --------------------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public API for this
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    opts = {o for a in parser._actions for o in a.option_strings}
    for sub in _subparsers(parser).values():  # `graceful registry CONFIG events --limit N`
        opts |= _options(sub)
    return opts


@lru_cache(maxsize=None)
def cli_commands() -> dict[str, set[str]]:
    from orchestrator.cli.main import build_parser

    return {name: _options(p) for name, p in _subparsers(build_parser()).items()}


def command_lines() -> Iterator[tuple[Snippet, str]]:
    """Code that may hold commands, trailing shell comments removed."""
    for s in code():
        text = re.sub(r"(?<=\S)\s+#\s.*$", "", s.text) if s.kind == "block" else s.text
        yield s, text


GRACEFUL = re.compile(r"(?:(?<=^)|(?<=[\s/(]))graceful\s+([a-z][a-z-]*)(?![\w:.-])")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
END_OF_COMMAND = re.compile(r"\s(?:\|\||&&|;|\|(?!\s*[a-z]+ ))\s|\s`")


def test_graceful_commands_and_their_options_exist():
    commands = cli_commands()
    offenders, seen = [], set()
    for s, text in command_lines():
        matches = list(GRACEFUL.finditer(text))
        for i, m in enumerate(matches):
            name = m.group(1)
            seen.add(name)
            if name not in commands:
                offenders.append(f"{s.where()}: `graceful {name}` is not a subcommand "
                                 f"(known: {', '.join(sorted(commands))})")
                continue
            end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
            rest = text[m.end():end]
            stop = END_OF_COMMAND.search(rest)
            rest = rest[:stop.start()] if stop else rest
            for opt in OPTION.findall(rest):
                if opt not in commands[name]:
                    offenders.append(f"{s.where()}: `graceful {name}` has no option {opt} "
                                     f"(it has: {', '.join(sorted(commands[name] - {'-h'}))})")
    report(offenders, "graceful commands or options that do not exist")
    assert {"demo", "train", "evaluate", "serve", "rollout"} <= seen, seen


BENCH = re.compile(r"python3?\s+(?:-m\s+benchmarks\.(\w+)|benchmarks/(\w+)\.py)")


def test_benchmark_commands_and_their_options_exist():
    offenders, seen = [], set()
    common = (ROOT / "benchmarks" / "common.py").read_text()
    for s, text in command_lines():
        for m in BENCH.finditer(text):
            name = m.group(1) or m.group(2)
            seen.add(name)
            script = ROOT / "benchmarks" / f"{name}.py"
            if not script.is_file():
                offenders.append(f"{s.where()}: benchmarks/{name}.py does not exist")
                continue
            rest = re.split(r"\s(?:&&|\|\||;|\|)\s|`", text[m.end():])[0]
            source = script.read_text() + common
            for opt in OPTION.findall(rest):
                if f'"{opt}"' not in source and f"'{opt}'" not in source:
                    offenders.append(f"{s.where()}: benchmarks/{name}.py defines no option {opt}")
    report(offenders, "benchmark commands or options that do not exist")
    assert {"nfr_pareto", "compat_retrieval", "train_overhead", "serving_overhead", "lqf", "chain_tax",
            "rollout_sim", "sample_report"} <= seen, seen


def test_benchmark_results_named_in_the_docs_exist():
    offenders = []
    for s in all_snippets():
        for path in re.findall(r"benchmarks/results/[\w.]+\.(?:json|png)", s.text):
            if not (ROOT / path).is_file():
                offenders.append(f"{s.where()}: {path} does not exist")
    report(offenders, "missing benchmark results")


# --- HTTP routes ---------------------------------------------------------------------------

ROUTE = re.compile(r"\b(GET|POST|PUT|DELETE) (/[\w/{}.-]*\w[}]?)")


def test_http_routes_in_the_docs_are_served():
    sources = "".join(p.read_text() for d in ("serving", "orchestrator") for p in (ROOT / d).rglob("*.py"))
    offenders, checked = [], 0
    for s in code():
        for m in ROUTE.finditer(s.text):
            checked += 1
            if f'"{m.group(2)}"' not in sources:
                offenders.append(f"{s.where()}: `{m.group(1)} {m.group(2)}`: no module of serving/ or "
                                 f"orchestrator/ has the route \"{m.group(2)}\"")
    report(offenders, "HTTP routes that nothing serves")
    assert checked > 10, checked


# --- Python references -------------------------------------------------------------------

def module_file(dotted: str) -> Optional[Path]:
    base = ROOT.joinpath(*dotted.split("."))
    for p in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


@lru_cache(maxsize=None)
def defined_names(path: Path) -> frozenset[str]:
    """Top-level names a module defines or imports (read with ast, not imported)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):  # guarded definitions and imports
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    names.add(sub.name)
                elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                    names |= {(a.asname or a.name).split(".")[0] for a in sub.names}
    return frozenset(names)


def python_reference_problem(ref: str) -> Optional[str]:
    """None when `pkg.module[.name]` or `pkg.module:name` names something that exists."""
    ref = ref.rstrip(".")
    mod_part, _, attr = ref.partition(":")
    parts = mod_part.split(".")
    for n in range(len(parts), 0, -1):
        path = module_file(".".join(parts[:n]))
        if path is None:
            continue
        rest = parts[n:] + ([attr] if attr else [])
        if rest and rest[0] not in defined_names(path):
            return f"{path.relative_to(ROOT)} defines no `{rest[0]}`"
        return None
    return f"no module {parts[0]}.{parts[1] if len(parts) > 1 else ''}"


PY_REF = re.compile(r"(?<![\w./-])((?:%s)(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*)?)" % "|".join(PACKAGES))
FROM_IMPORT = re.compile(r"^\s*from\s+((?:%s)[\w.]*)\s+import\s+([\w, ]+)" % "|".join(PACKAGES))


FILE_SUFFIXES = ("py", "md", "yaml", "yml", "json", "png", "sqlite", "pt", "txt", "sh", "npz")


def is_config_key(ref: str) -> bool:
    """`serving.host` is a config key; `serving.client` a module, `data.py` a file."""
    section, _, rest = ref.partition(".")
    section = section.split("[")[0]  # generations[].compat
    if ref.rsplit(".", 1)[-1] in FILE_SUFFIXES:
        return False
    if section not in config_sections() or module_file(f"{section}.{rest.split('.')[0]}") is not None:
        return False
    return resolve_config_key(ref)[1] is None or not names_installed_attribute(ref)


def names_installed_attribute(ref: str) -> bool:
    """`ray.serve.metrics`, `ray.nodes`: an attribute of an installed package that shares
    its name with a config section (`ray:`), not a config key."""
    import importlib

    parts = ref.split(".")
    try:
        obj: Any = importlib.import_module(parts[0])
    except ImportError:
        return False
    for p in parts[1:2]:
        if hasattr(obj, p):
            continue
        try:  # a submodule not imported yet (`ray.serve` before anything imported it)
            importlib.import_module(f"{parts[0]}.{p}")
        except ImportError:
            return False
    return True


def test_python_references_exist():
    offenders = []
    for s in code():
        if s.kind == "block" and s.lang == "python":
            m = FROM_IMPORT.match(s.text)
            if m:
                for name in (n.strip() for n in m.group(2).split(",")):
                    problem = python_reference_problem(f"{m.group(1)}.{name}")
                    if name and problem:
                        offenders.append(f"{s.where()}: `from {m.group(1)} import {name}`: {problem}")
        if s.kind != "span":
            continue
        for m in PY_REF.finditer(s.text):
            ref = m.group(1)
            if ref.endswith((".py", ".md", ".yaml", ".json")) or is_config_key(ref):
                continue
            problem = python_reference_problem(ref)
            if problem:
                offenders.append(f"{s.where()}: `{ref}`: {problem}")
    report(offenders, "Python references to names that do not exist")


# --- (d) config keys ---------------------------------------------------------------------

from orchestrator.config import _model_in  # noqa: E402  the loader's own walk of nested models


def _is_list(annotation: Any) -> bool:
    origin = getattr(annotation, "__origin__", None)
    if origin in (list, tuple):
        return True
    return any(_is_list(a) for a in getattr(annotation, "__args__", ()) or ())


@lru_cache(maxsize=None)
def config_sections() -> frozenset[str]:
    from orchestrator.config import RunConfig

    return frozenset(RunConfig.model_fields)


def resolve_config_key(key: str) -> tuple[Any, Optional[str]]:
    """(the pydantic field, None) for a key path such as `generations[].compat.bct.weight`,
    or (None, what is wrong)."""
    from orchestrator.config import RunConfig

    model: Any = RunConfig
    walked, field = "", None
    for part in key.split("."):
        m = re.fullmatch(r"([A-Za-z_]\w*)((?:\[\d*\])*)", part)
        if not m:
            return None, f"`{part}` is not a key"
        name, index = m.groups()
        if model is None:
            return None, f"`{walked}` has no sub-keys"
        field = model.model_fields.get(name)
        if field is None:
            return None, (f"{model.__name__} ({walked or 'top level'}) has no key `{name}` "
                          f"(keys: {', '.join(model.model_fields)})")
        if index and not _is_list(field.annotation):
            return None, f"`{walked + '.' if walked else ''}{name}` is not a list"
        walked = f"{walked}.{part}" if walked else part
        model = _model_in(field.annotation)
    return field, None


def config_key_problem(key: str) -> Optional[str]:
    return resolve_config_key(key)[1]


def config_key_pattern() -> re.Pattern:
    sections = "|".join(sorted(config_sections(), key=len, reverse=True))
    # not after a word, a dot or a single slash (`workers/data.py`); `http://serving.host` is a key
    # nor before a slash: `ray.io/is-ray-node` is a Kubernetes label
    return re.compile(r"(?<![\w.-])(?<![^/]/)((?:%s)(?:\[\d*\])?(?:\.[A-Za-z_]\w*(?:\[\d*\])?)+)(?![\w/])" % sections)


def test_config_keys_in_backticks_exist():
    pattern = config_key_pattern()
    offenders, checked = [], 0
    for s in code():
        if s.kind != "span" or s.text.lstrip().startswith(("from ", "import ")):
            continue
        for m in pattern.finditer(s.text):
            key = m.group(1)
            if not is_config_key(key):
                continue  # a module path: test_python_references_exist
            checked += 1
            problem = config_key_problem(key)
            if problem:
                offenders.append(f"{s.where()}: config key `{key}`: {problem}")
    report(offenders, "config keys that do not exist")
    assert checked > 20, checked


MARKER = re.compile(r"<!--\s*config-keys:\s*([^\s>]*)\s*-->")


def marked_tables() -> Iterator[tuple[Path, int, str, list[tuple[int, str]]]]:
    """(doc, line, prefix, [(line, first cell)]) of each table under a config-keys marker."""
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = MARKER.search(line)
            if not m:
                continue
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            rows = []
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                rows.append((j + 1, lines[j].strip().strip("|").split("|")[0]))
                j += 1
            yield path, i + 1, m.group(1).rstrip(".:"), rows[2:]  # header and rule left out


def table_keys(cell: str) -> list[str]:
    """Keys of a first cell: `bct.weight`; `alpha`, `.beta` (siblings of the previous)."""
    keys: list[str] = []
    for raw in SPAN.findall(cell):
        raw = raw.strip()
        if keys and (raw.startswith(".") or "." not in raw):
            raw = keys[-1].rsplit(".", 1)[0] + "." + raw.lstrip(".") if "." in keys[-1] else raw.lstrip(".")
        keys.append(raw)
    return keys


def test_keys_of_marked_config_tables_exist():
    offenders, tables = [], 0
    for path, line, prefix, rows in marked_tables():
        tables += 1
        if not rows:
            offenders.append(f"{path.relative_to(ROOT)}:{line}: a config-keys marker without a table below it")
        for row_line, cell in rows:
            for key in table_keys(cell):
                full = f"{prefix}.{key}" if prefix else key
                problem = config_key_problem(full)
                if problem:
                    offenders.append(f"{path.relative_to(ROOT)}:{row_line}: config key `{full}`: {problem}")
    report(offenders, "config keys in tables that do not exist")
    assert tables >= 5, f"only {tables} tables marked <!-- config-keys: PREFIX -->"


def documented_default_problem(key: str, documented: str) -> Optional[str]:
    """None when a table's default matches the model's (or cannot be compared)."""
    from pydantic_core import PydanticUndefined

    field, _ = resolve_config_key(key)
    if field is None or field.default is PydanticUndefined:
        return None
    actual = field.default
    text = documented.strip().strip("`")
    if text in ("null", "unset", "none") or text.startswith(("unset", "null")):
        return None if actual is None else f"documented as unset, the model's default is {actual!r}"
    if text in ("true", "false"):
        return None if actual is (text == "true") else f"documented {text}, the model's default is {actual!r}"
    try:
        number = float(text)
    except ValueError:
        return None if str(actual) == text else f"documented {text!r}, the model's default is {actual!r}"
    if isinstance(actual, bool) or not isinstance(actual, (int, float)) or abs(actual - number) > 1e-12:
        return f"documented {text}, the model's default is {actual!r}"
    return None


def test_defaults_in_marked_config_tables_match_the_models():
    offenders = []
    for path, _, prefix, rows in marked_tables():
        lines = path.read_text().splitlines()
        for row_line, cell in rows:
            cells = [c.strip() for c in lines[row_line - 1].strip().strip("|").split("|")]
            header = [c.strip() for c in lines[rows[0][0] - 3].strip().strip("|").split("|")] if rows else []
            if len(cells) < 2 or len(header) < 2 or header[1] != "default":
                continue
            keys = table_keys(cell)
            values = [v.strip() for v in cells[1].split(",")] if len(keys) > 1 else [cells[1]]
            if len(values) != len(keys):
                continue
            for key, value in zip(keys, values):
                full = f"{prefix}.{key}" if prefix else key
                problem = documented_default_problem(full, value)
                if problem:
                    offenders.append(f"{path.relative_to(ROOT)}:{row_line}: `{full}`: {problem}")
    report(offenders, "documented defaults that differ from the config models")


def test_every_rollout_and_gate_key_is_documented():
    from orchestrator.config import GatesSpec, RolloutSpec

    keys = {(prefix, k) for path, _, prefix, rows in marked_tables() for _, cell in rows for k in table_keys(cell)}
    missing = [f"rollout.{k}" for k in RolloutSpec.model_fields if ("rollout", k) not in keys
               and not any(p == "rollout" and key.startswith(k + "[") for p, key in keys)]
    missing += [f"gates.{k}" for k in GatesSpec.model_fields if ("gates", k) not in keys]
    assert not missing, f"keys without a row in a marked table of docs/: {missing}"


# --- (e) metric names ----------------------------------------------------------------------

@lru_cache(maxsize=None)
def exported_metrics() -> dict[str, str]:
    """Every exported metric name -> the module exporting it (any `metric_names.py`)."""
    found: dict[str, str] = {}
    for path in sorted(p for d in ("orchestrator", "serving", "workers") for p in (ROOT / d).rglob("metric_names.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for name in importlib.import_module(module).EXPORTED:
            found[name] = module
    assert len({m for m in found.values()}) >= 2, f"expected the router's and the controller's: {found}"
    return found


METRIC = re.compile(r"(?<![\w-])((?:ray_)?graceful(?:_[a-z0-9]+)*)(_\*)?(?![\w-])")


def test_metric_names_in_the_docs_are_exported():
    exported = exported_metrics()
    offenders, checked = [], 0
    for s in all_snippets():
        # spans are checked as their own snippets
        text = blank_spans(s.text) if s.kind == "prose" else s.text
        for m in METRIC.finditer(text):
            name, star = m.groups()
            if name in ("graceful", "ray_graceful") and not star:
                continue  # the project's name, not a metric
            checked += 1
            where = line_of(s, text, m.start())
            if star and not any(e.startswith(name + star[:-1]) for e in exported):
                offenders.append(f"{where}: `{name}{star}` matches no exported metric")
            elif not star and name not in exported:
                close = [e for e in exported if e.startswith(name) or name.startswith(e)]
                offenders.append(f"{where}: metric `{name}` is not exported"
                                 + (f" (did you mean {', '.join(close)}?)" if close else ""))
    report(offenders, "metric names that no metric_names.py exports")
    assert checked > 20, checked


def test_every_exported_metric_is_in_the_metrics_reference():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    missing = [f"{n} ({m})" for n, m in exported_metrics().items() if f"`{n}`" not in doc]
    report(missing, "exported metrics missing from docs/metrics.md")


# --- citations of files outside the repository ----------------------------------------------

# Spelled in pieces so that this file does not cite them itself.
OUTSIDE = re.compile("shared" r"/notes|(?<![\w/])notes" r"/[\w-]+\.md|\bDESIGN" r"\.md")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".toml", ".sh", ".txt", ".cfg", ".ini", ""}
SKIP_DIRS = {".git", ".venv", "__pycache__", "runs", ".pytest_cache", "build", "dist", ".cache", ".gl"}


def repository_text_files() -> Iterator[Path]:
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix in TEXT_SUFFIXES and path.stat().st_size < 2_000_000:
                yield path


def test_nothing_cites_files_outside_the_repository():
    offenders = []
    for path in repository_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            for m in OUTSIDE.finditer(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: cites `{m.group(0)}`, which is not in the repository")
    report(offenders, "citations of files outside the repository (state the fact, or cite a file of docs/)")


# --- the checker itself --------------------------------------------------------------------

@pytest.mark.parametrize("key, ok", [
    ("rollout.max_source_errors", True), ("generations[].compat.bct.weight", True),
    ("generations[0].train.lr", True), ("serving.admin_token_env", True), ("run_dir", True),
    ("rollout.steps[].bake_seconds", True), ("gates.max_nfr", True),
    ("rollout.max_source_error", False), ("generations.compat", True), ("gates[].max_nfr", False),
    ("run_dir.x", False),
])
def test_config_key_resolution(key, ok):
    assert (config_key_problem(key) is None) is ok, config_key_problem(key)


def test_table_keys_are_read_relative_to_their_neighbours():
    assert table_keys("`focal_distillation.alpha`, `.beta`") == ["focal_distillation.alpha", "focal_distillation.beta"]
    assert table_keys("`steps[].bake_seconds`, `min_requests`, `min_labels`") == [
        "steps[].bake_seconds", "steps[].min_requests", "steps[].min_labels"]
    assert table_keys("`target_scale`") == ["target_scale"]


def test_the_patterns_find_what_they_should():
    assert [m.group(1) for m in GRACEFUL.finditer("GRACEFUL_X=1 .venv/bin/graceful demo --fresh")] == ["demo"]
    assert not GRACEFUL.search("graceful installed: torch") and not GRACEFUL.search("graceful-gen-g1 up")
    assert [m.group(1) for m in PATH.finditer("see `orchestrator/rollout/decision.py` and /etc/deploy/x")] == [
        "orchestrator/rollout/decision.py"]
    assert [m.group(1) for m in config_key_pattern().finditer("http://serving.host:serving.port workers/data.py")] == [
        "serving.host", "serving.port"]
    assert [m.group(1) for m in METRIC.finditer("ray_graceful_requests_total{x} GRACEFUL_CACHE graceful-controller")] == [
        "ray_graceful_requests_total"]
    assert [m.group(1) for m in METRIC.finditer("the `graceful` CLI")] == ["graceful"]  # skipped by the test
    assert [m.groups() for m in METRIC.finditer("`ray_graceful_*`, graceful_rollout_*")] == [
        ("ray_graceful", "_*"), ("graceful_rollout", "_*")]
    assert is_config_key("generations[].compat") and is_config_key("serving.host")
    assert not is_config_key("serving.client") and not is_config_key("data.py")
    assert python_reference_problem("orchestrator.apps:router_app") is None
    assert python_reference_problem("workers.train.no_such_function") is not None
    assert OUTSIDE.search("see " + "shared" + "/notes/x.md") and OUTSIDE.search("DESIGN" + ".md")
    assert not OUTSIDE.search("tests/helpers.py") and not OUTSIDE.search("the shared volume")
