"""`graceful validate CONFIG`: check a config file, listing every problem (exit 2)."""

from __future__ import annotations

import argparse
import sys

from orchestrator.cli.common import EXIT_OK, EXIT_USAGE, add_config_arg, add_json_arg, emit
from orchestrator.config import ConfigError, load_config


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
