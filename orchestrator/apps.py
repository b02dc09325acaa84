"""Ray Serve application builders: `graceful serve` as a declarative Serve config.

A KubeRay RayService (deploy/kuberay/rayservice.yaml) lists one application per
generation and one router application, each built here from the same run config file
that `graceful train` and `graceful serve` read:

    applications:
      - {name: graceful-gen-g0, route_prefix: null,
         import_path: "orchestrator.apps:generation_app",
         args: {config: /config/run.yaml, generation: g0}}
      - {name: graceful, route_prefix: /, import_path: "orchestrator.apps:router_app",
         args: {config: /config/run.yaml, production: g0, candidates: [g1]}}

The applications are built by the same functions `serving.deploy.start_serving` deploys
imperatively (`generation_application`, `router_application`), so the controller and the dashboards
see the same thing on a laptop and on a cluster. A generation application's name must be
`graceful-gen-<generation>` (`serving.refs.app_name_for`): the router finds it by that name.
Builders run in Serve's build task, where the config and the run directory must be
readable; every checkpoint is verified by sha256 there and again in its replica.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Iterable

from ray import serve
from ray.serve import Application

from orchestrator.cli.common import UsageError
from orchestrator.cli.serve import NotTrained, build_gallery, resolve_ref
from orchestrator.config import ConfigError, RunConfig, load_config
from serving.deploy import generation_application, router_application
from serving.router import Router

_ARGS = {"generation_app": {"config", "generation"},
         "router_app": {"config", "production", "candidates", "shadows", "wait_s"}}


class AppArgsError(ValueError):
    """Arguments of a builder in a Serve config that cannot be used (the message says why)."""


def _config(builder: str, args: Any) -> RunConfig:
    if not isinstance(args, dict):
        raise AppArgsError(f"{builder}: args must be a mapping, got {type(args).__name__}")
    unknown = sorted(set(args) - _ARGS[builder])
    if unknown:
        raise AppArgsError(f"{builder}: unknown args {unknown}; known: {sorted(_ARGS[builder])}")
    if not isinstance(args.get("config"), str) or not args["config"]:
        raise AppArgsError(f"{builder}: args.config (path of the run config file) is required")
    try:
        return load_config(args["config"])
    except ConfigError as e:
        raise AppArgsError(f"{builder}: run config is not valid:\n" + "\n".join(e.problems)) from None


def _ref(cfg: RunConfig, builder: str, name: Any):
    if not isinstance(name, str) or not name:
        raise AppArgsError(f"{builder}: a generation name must be a non-empty string, got {name!r}")
    try:
        return resolve_ref(cfg, name)
    except (UsageError, NotTrained) as e:
        raise AppArgsError(f"{builder}: {e}") from None


def generation_app(args: dict) -> Application:
    """One generation's model deployment (`ModelServer`, options from `serving:`).

    args: {"config": path of the run config, "generation": name}.
    """
    cfg = _config("generation_app", args)
    return generation_application(_ref(cfg, "generation_app", args.get("generation")), cfg.serving)

async def wait_for_apps(names: Iterable[str], timeout_s: float,
                        lookup: Callable[[str], Any] = serve.get_app_handle,
                        sleep: Callable[[float], Any] = asyncio.sleep,
                        clock: Callable[[], float] = time.monotonic) -> None:
    """Return once `lookup(name)` succeeds for every name; TimeoutError naming the missing
    ones after `timeout_s`.

    Serve builds the applications of a config concurrently, so the router may start before
    a generation's application exists; `serve.get_app_handle` raises until it does.
    """
    missing = list(dict.fromkeys(names))
    deadline = clock() + timeout_s
    while True:
        still = []
        for name in missing:
            try:
                lookup(name)
            except Exception:
                still.append(name)
        missing = still
        if not missing:
            return
        if clock() >= deadline:
            raise TimeoutError(f"Serve applications {missing} did not appear within {timeout_s:g} s; "
                               f"list them in the same Serve config as the router")
        await sleep(1.0)


class ClusterRouter(Router):
    """The router, first waiting for its generations' applications to exist."""

    async def __init__(self, *args, app_names: tuple[str, ...] = (), wait_s: float = 600.0):
        await wait_for_apps(app_names, wait_s)
        await super().__init__(*args)


def router_app(args: dict) -> Application:
    """The router ingress, serving `production` with each of `candidates` in shadow.

    args: {"config": path, "production": name (default: the first generation),
    "candidates": [names] (default none), "shadows": [names] (default: the candidates),
    "wait_s": seconds to wait for the generation applications (default 600)}.
    The retrieval gallery is embedded here once, by `gallery_generation`; the admin token
    comes from `serving.admin_token` or the `serving.admin_token_env` variable.
    """
    cfg = _config("router_app", args)
    production = args.get("production") or cfg.generations[0].name
    candidates = args.get("candidates") or []
    if not isinstance(candidates, list):
        raise AppArgsError(f"router_app: args.candidates must be a list of names, got {candidates!r}")
    names = list(dict.fromkeys(candidates))
    if production in names:
        raise AppArgsError(f"router_app: {production!r} is production; it cannot also be a candidate")
    shadows = args.get("shadows")
    if shadows is not None and (not isinstance(shadows, list) or not set(shadows) <= set(names)):
        raise AppArgsError(f"router_app: args.shadows must be a list of candidates {names}, got {shadows!r}")
    wait_s = args.get("wait_s", 600.0)
    if not isinstance(wait_s, (int, float)) or wait_s <= 0:
        raise AppArgsError(f"router_app: args.wait_s must be a positive number, got {wait_s!r}")
    prod_ref = _ref(cfg, "router_app", production)
    cands = [_ref(cfg, "router_app", n) for n in names]
    local = cfg.serving.in_router_models
    return router_application(
        cfg.serving, prod_ref, cands, build_gallery(cfg), None, shadows, cfg.serving.resolved_admin_token(), router_cls=ClusterRouter,
        app_names=() if local else tuple(r.app_name for r in [prod_ref, *cands]), wait_s=float(wait_s))
