"""`graceful serve CONFIG`: production and candidates side by side on Ray Serve.

Generations are resolved to `serving.refs.ModelRef`s here (serving never imports the
orchestrator): from the run directory `graceful train` wrote
(run_dir/generations/<name>/model.pt + metrics.json with its sha256). Production is the
first generation unless `--production` names one; `--candidate` (repeatable) adds shadows.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Optional

from orchestrator.chain import generation_dir, read_metrics
from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, UsageError, add_config_arg, add_json_arg, emit, load_or_exit
from orchestrator.config import RunConfig
from serving.refs import Gallery, ModelRef


class NotTrained(RuntimeError):
    """A generation named for serving has no verified checkpoint yet."""


def resolve_ref(cfg: RunConfig, name: str) -> ModelRef:
    """The checkpoint of generation `name` as `graceful train` recorded it."""
    try:
        cfg.generation(name)
    except KeyError as e:
        raise UsageError(str(e.args[0])) from None
    metrics = read_metrics(cfg, name)
    if metrics is None or not metrics.get("sha256"):
        raise NotTrained(f"generation {name!r} is not trained (no {generation_dir(cfg, name)}/model.pt "
                         f"with metrics.json); run: graceful train CONFIG --generation {name}")
    return ModelRef(name, str(generation_dir(cfg, name) / "model.pt"), metrics["sha256"])


def build_gallery(cfg: RunConfig) -> Gallery:
    """Embed the data's gallery split once with the gallery generation's verified model."""
    from workers.checkpoint import load_model
    from workers.data import load_dataset
    from workers.training import predict

    ref = resolve_ref(cfg, cfg.gallery)
    model, _ = load_model(ref.uri, ref.sha256)
    gallery = load_dataset(cfg.data).gallery
    emb, _ = predict(model, gallery.x)
    return Gallery(ref.name, emb, gallery.y)


def _cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args.config)
    spec = cfg.serving.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    production = args.production or cfg.generations[0].name
    names = list(dict.fromkeys(args.candidate or []))
    if production in names:
        raise UsageError(f"--candidate {production}: that generation is production")
    try:
        prod_ref = resolve_ref(cfg, production)
        cand_refs = [resolve_ref(cfg, n) for n in names]
        gallery = build_gallery(cfg)
    except NotTrained as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    token = cfg.serving.resolved_admin_token()

    import ray
    from ray import serve

    from serving.deploy import start_serving

    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = start_serving(spec, prod_ref, cand_refs, gallery=gallery, admin_token=token)
        info = {"url": url, "production": production, "candidates": names, "gallery": gallery.generation,
                "admin": bool(token)}
        emit(info, args.json, lambda i: f"serving {i['production']} (shadows: {', '.join(i['candidates']) or 'none'}) "
                                        f"at {i['url']}; admin routes "
                                        f"{'on' if i['admin'] else 'OFF: set ' + cfg.serving.admin_token_env}; "
                                        f"Ctrl-C stops")
        sys.stdout.flush()
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            stop.wait(0.5)
    finally:
        serve.shutdown()
        ray.shutdown()
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve production and candidates on Ray Serve (router on 127.0.0.1)")
    add_config_arg(p)
    p.add_argument("--production", help="generation in production (default: the first)")
    p.add_argument("--candidate", action="append", help="candidate generation to shadow (repeatable)")
    p.add_argument("--host", help="bind address (default: serving.host)")
    p.add_argument("--port", type=int, help="HTTP port (default: serving.port)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    add_json_arg(p)
    p.set_defaults(func=_cmd_serve)
