"""The `graceful` command line.

Exit codes (a contract): 0 ok, 1 the action failed or a gate failed, 2 bad usage or bad
config. Every command that reports state takes `--json`. Each group of commands lives in
its own module with a `register(subparsers)` function, listed in COMMAND_MODULES.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Callable, Optional

from orchestrator.config import ConfigError, RunConfig, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# Modules adding subcommands; each defines register(subparsers) -> None.
COMMAND_MODULES: list[str] = [
    "orchestrator.cli",
    "orchestrator.cli_train",
    "orchestrator.cli_serve",
    "orchestrator.cli_registry",
    "orchestrator.cli_rollout",
    "orchestrator.cli_demo",
]


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


def load_or_exit(path: str) -> RunConfig:
    """Load a config for a command; print every problem and exit 2 when it is bad."""
    try:
        return load_config(path)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def emit(payload: Any, as_json: bool, render: Optional[Callable[[Any], str]] = None) -> None:
    """Print `payload` as JSON, or as text through `render`."""
    if as_json:
        print(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        print(render(payload) if render else payload)


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (e.g. config/demo.yaml)")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


# --- validate ----------------------------------------------------------------------------

def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        if args.json:
            emit({"ok": False, "problems": e.problems}, True)
        else:
            for line in e.problems:
                print(line, file=sys.stderr)
        return EXIT_USAGE
    summary = {
        "ok": True, "problems": [], "run_dir": str(cfg.run_dir),
        "generations": [g.name for g in cfg.generations], "config_hash": cfg.config_hash(),
    }
    emit(summary, args.json, lambda s: f"{args.config}: ok ({len(s['generations'])} generations: "
                                       f"{', '.join(s['generations'])}; run_dir {s['run_dir']})")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a config file; exit 2 listing every problem")
    add_config_arg(p)
    add_json_arg(p)
    p.set_defaults(func=_cmd_validate)


# --- entry point -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graceful", description="Continual model updates without regressions, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # load_or_exit: the problems are printed already
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except Exception as e:  # one line for the operator; the traceback on request
        if os.environ.get("GRACEFUL_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (GRACEFUL_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
