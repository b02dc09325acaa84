"""`graceful run CONFIG [--until-idle]` (the continuous pipeline) and
`graceful pipeline pause|resume CONFIG`.

`run` takes every listed generation through train, the offline gate and the rollout to a
final stage, one at a time, starting the serving plane when no router answers at
serving.host:port (docs/pipeline.md). Exit 0 (with --until-idle: once every listed
generation is final), 1 when the loop stopped on repeated errors, 2 for a bad config,
130 on Ctrl-C / SIGTERM (a restart continues from the registry).
`pause` stops the pipeline from taking new generations (a running rollout goes on);
`resume` lets it go on. Both are audited.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from orchestrator.cli.common import EXIT_OK, add_config_arg, add_json_arg, emit, load_or_exit


def _cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.pipeline.loop import run_pipeline

    cfg = load_or_exit(args.config)
    # The library's own progress (graceful.* loggers: the RayService attach's waits) on
    # stderr beside the loop's lines; Ray's loggers keep their own handlers.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logging.getLogger("graceful").addHandler(handler)
    logging.getLogger("graceful").setLevel(logging.INFO)
    stop = threading.Event()
    got = {"signal": None}

    def on_signal(signum, _frame):
        got["signal"] = signum
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    rc = run_pipeline(cfg, until_idle=args.until_idle, stop=stop, max_seconds=args.max_seconds,
                      log=lambda m: print(m, flush=True))
    return 130 if got["signal"] is not None else rc


def _cmd_pause(args: argparse.Namespace, paused: bool) -> int:
    from orchestrator.pipeline.loop import set_paused
    from orchestrator.registry import open_registry

    cfg = load_or_exit(args.config)
    actor = args.actor or os.environ.get("USER") or "operator"
    with open_registry(cfg) as reg:
        changed = set_paused(reg, paused, actor, args.reason or ("paused" if paused else "resumed"))
    out = {"paused": paused, "changed": changed}
    emit(out, args.json, lambda o: f"pipeline {'paused' if paused else 'resumed'}"
                                   + ("" if changed else " already"))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the continuous pipeline: train, gate and roll out every listed generation")
    add_config_arg(p)
    p.add_argument("--until-idle", action="store_true", help="exit 0 once every listed generation is final")
    p.add_argument("--max-seconds", type=float, help="stop after this long (a restart continues)")
    p.set_defaults(func=_cmd_run)
    q = sub.add_parser("pipeline", help="pause or resume the pipeline's taking of new generations")
    qs = q.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    for name, paused in (("pause", True), ("resume", False)):
        x = qs.add_parser(name, help=f"{name} taking new generations (a running rollout is not touched)")
        add_config_arg(x)
        x.add_argument("--reason", help="recorded in the audit log")
        x.add_argument("--actor", help="who (default $USER)")
        add_json_arg(x)
        x.set_defaults(func=lambda a, p=paused: _cmd_pause(a, p))
