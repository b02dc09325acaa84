"""`graceful demo [CONFIG]`: the whole lifecycle on the embedded default (config/demo.yaml)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, UsageError, add_json_arg, emit, load_or_exit

# The embedded default: in the source tree (editable installs, the container image), else
# ./config/demo.yaml of a clone the command runs in.
DEFAULT_CONFIGS = (Path(__file__).resolve().parents[2] / "config" / "demo.yaml", Path("config") / "demo.yaml")


def default_config() -> str:
    for p in DEFAULT_CONFIGS:
        if p.is_file():
            return str(p)
    raise UsageError("no config given and config/demo.yaml not found (the package was installed without its "
                     "source tree); pass a config file: graceful demo CONFIG")


def _stdout_to_stderr() -> int:
    """Point file descriptor 1 at stderr; returns a copy of the old one to restore."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    return saved


def _cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.demo.run import DemoInterrupted, refuse_shared_registry, run_demo

    path = args.config or default_config()
    cfg = load_or_exit(path)
    if args.port is not None:
        cfg = cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"port": args.port})})
    try:
        refuse_shared_registry(cfg)
    except ValueError as e:
        raise UsageError(f"{path}: {e}") from None
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    # With --json, stdout carries the summary only: Ray's own messages (its C++ core writes
    # to file descriptor 1 directly) go to stderr with the progress.
    saved = _stdout_to_stderr() if args.json else None
    try:
        summary = run_demo(cfg, log=log, fresh=args.fresh, rollout_seconds=args.rollout_seconds)
    except DemoInterrupted:
        raise KeyboardInterrupt from None
    finally:
        if saved is not None:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
    if args.json:
        emit(summary, True)
    return EXIT_OK if all(g["outcome"] in ("promoted", "rolled_back", "rejected")
                          for g in summary["generations"]) else EXIT_FAILED


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train, gate, serve, shadow, canary, promote and roll back a chain end to end")
    p.add_argument("config", nargs="?", help="run config (default: config/demo.yaml of the source tree)")
    p.add_argument("--fresh", action="store_true", help="remove the run directory first (retrains every generation)")
    p.add_argument("--port", type=int, help="router HTTP port (default: serving.port)")
    p.add_argument("--rollout-seconds", type=float, default=120.0,
                   help="give up on a rollout that is not final after this long (default 120)")
    add_json_arg(p)
    p.set_defaults(func=_cmd_demo)
