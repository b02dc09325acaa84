"""The `graceful` command line: the parser and the entry point.

Each group of commands lives in its own module of this package with a
`register(subparsers)` function, listed in COMMAND_MODULES; the modules only parse, call
the library and print (`orchestrator.cli.common` holds what they share).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

from orchestrator.cli.common import EXIT_FAILED, EXIT_USAGE, UsageError

# Modules adding subcommands; each defines register(subparsers) -> None.
COMMAND_MODULES: list[str] = [
    "orchestrator.cli.validate",
    "orchestrator.cli.train",
    "orchestrator.cli.serve",
    "orchestrator.cli.registry",
    "orchestrator.cli.rollout",
    "orchestrator.cli.labels",
    "orchestrator.cli.catalogue",
    "orchestrator.cli.pipeline",
    "orchestrator.cli.demo",
]


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

