"""`graceful serve CONFIG`: the registry's production and candidates side by side on Ray Serve.

Production and the traffic plan are the registry's (`orchestrator.apps`): `--production`
can only confirm it, `--candidate` (repeatable) adds shadows, and a rollout in progress
keeps its candidate and weight. Checkpoints are the registry's, verified by sha256.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from orchestrator.apps import NotTrained, ServeRequestError, build_catalogue, generation_ref, serving_plan, start_router
from orchestrator.config import init_ray
from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, UsageError, add_config_arg, add_json_arg, emit, load_or_exit
from orchestrator.registry import IntegrityError, open_registry
from serving.catalogue import CatalogueError
from workers.data import DataError
from workers.factory import FactoryError


def _cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args.config)
    spec = cfg.serving.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    token = cfg.serving.resolved_admin_token()

    import ray
    from ray import serve

    reg = open_registry(cfg)
    stop = threading.Event()
    try:
        try:  # before Ray starts: a request the registry contradicts is refused at once
            plan = serving_plan(cfg, reg, args.candidate or [], args.production)
            generation_ref(cfg, reg, cfg.gallery)  # the catalogue's model: trained and intact
        except ServeRequestError as e:
            raise UsageError(str(e)) from None
        except (NotTrained, IntegrityError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_FAILED
        init_ray(cfg, address=os.environ.get("RAY_ADDRESS"))
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        try:  # embedded once with Ray Data unless the catalogue exists
            catalogue = build_catalogue(cfg, reg, log=None if args.json else lambda m: print(m, file=sys.stderr))
        except (DataError, FactoryError) as e:
            raise UsageError(f"catalogue: {e}") from None
        except CatalogueError as e:
            print(f"error: catalogue: {e}", file=sys.stderr)
            return EXIT_FAILED
        url = start_router(cfg, reg, plan, catalogue=catalogue, spec=spec, admin_token=token)
        info = {"url": url, "production": plan.production.name, "candidates": [c.name for c in plan.candidates],
                "weights": plan.weights, "shadows": list(plan.shadows), "gallery": cfg.gallery, "catalogue": str(catalogue), "admin": bool(token),
                "registry": reg.location}
        emit(info, args.json, lambda i: f"serving {i['production']} (from the registry; shadows: "
                                        f"{', '.join(i['shadows']) or 'none'}) at {i['url']}; admin routes "
                                        f"{'on' if i['admin'] else 'OFF: set ' + cfg.serving.admin_token_env}; "
                                        f"Ctrl-C stops")
        sys.stdout.flush()
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            stop.wait(0.5)
    finally:
        reg.close()
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the registry's production and candidates on Ray Serve (router on 127.0.0.1)")
    add_config_arg(p)
    p.add_argument("--production", help="refuse to start unless the registry's production is this generation")
    p.add_argument("--candidate", action="append", help="candidate generation to shadow (repeatable)")
    p.add_argument("--host", help="bind address (default: serving.host)")
    p.add_argument("--port", type=int, help="HTTP port (default: serving.port)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    add_json_arg(p)
    p.set_defaults(func=_cmd_serve)
