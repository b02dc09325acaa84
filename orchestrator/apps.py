"""What to serve, from the registry: every way of starting the router starts here.

`graceful serve`, the demo and the RayService builders below resolve generations to
checkpoints through the registry (registered through the one registration path,
`orchestrator.registry.register_trained`; bytes verified against the registry's
sha256), and take production and the traffic plan from the registry, never from the
YAML's order. The router is also handed a `RegistryPlan`: a replica that restarts (a
crash, a RayService upgrade) reads production and the rollout's position again from the
registry before it answers, so it never comes back with a stale plan.

A KubeRay RayService (deploy/kuberay/rayservice.yaml) lists one application per
generation and one router application, each built here from the same run config file
that `graceful train` and `graceful serve` read:

    applications:
      - {name: graceful-gen-g0, route_prefix: null,
         import_path: "orchestrator.apps:generation_app",
         args: {config: /config/run.yaml, generation: g0}}
      - {name: graceful, route_prefix: /, import_path: "orchestrator.apps:router_app",
         args: {config: /config/run.yaml, candidates: [g1]}}

The applications are built by the same functions `serving.deploy.start_serving` deploys
imperatively (`generation_application`, `router_application`), so the controller and
the dashboards see the same thing on a laptop and on a cluster. A generation
application's name must be `graceful-gen-<generation>` (`serving.refs.app_name_for`):
the router finds it by that name. Builders run in Serve's build task, where the config
and the run directory must be readable; every checkpoint is verified by sha256 there and
again in its replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from ray import serve

from orchestrator.config import ConfigError, RunConfig, init_ray, load_config
from orchestrator.registry import (GenerationStatus, NotTrainedError, Registry, RegistryError, ensure_registered,
                                   open_registry, production_of)
from orchestrator.registry.backends import is_url
from orchestrator.rollout.plan import registry_plan
from serving.catalogue import CatalogueError
from serving.refs import ModelRef
from serving.router import Router
from workers.data import DataError

log = logging.getLogger("graceful.apps")

_ARGS = {"generation_app": {"config", "generation"},
         "router_app": {"config", "production", "candidates", "shadows", "wait_s"}}

# Never shadowed again by a router (re)start: their rollout ended.
_NOT_SHADOWED = (GenerationStatus.ROLLED_BACK, GenerationStatus.RETIRED)


class NotTrained(RuntimeError):
    """A generation named for serving has no trained, registered checkpoint."""


class ServeRequestError(ValueError):
    """A request to serve that contradicts the registry or the config (the message says why)."""


def generation_ref(cfg: RunConfig, reg: Registry, name: str, actor: str = "serve") -> ModelRef:
    """The checkpoint of `name` as the registry recorded it (registered from the run dir
    first when it was trained but never registered), after checking its bytes against
    the registry's sha256 (IntegrityError otherwise). The ref names the model factory the
    config expects (`orchestrator.chain.expected_factory_of`), so whatever loads it refuses
    a checkpoint built by another one."""
    from orchestrator.chain import expected_factory_of

    try:
        cfg.generation(name)
    except KeyError as e:
        if reg.generation(name) is None:
            raise ServeRequestError(str(e.args[0])) from None
    try:
        rec = ensure_registered(cfg, reg, name, actor)
    except NotTrainedError as e:
        raise NotTrained(str(e)) from None
    reg.verify_checkpoint(name)
    return ModelRef(name, rec.checkpoint_uri, rec.sha256, expected_factory_of(cfg, name))


def production_name(cfg: RunConfig, reg: Registry, asked: Optional[str] = None) -> str:
    """The registry's production generation. A run dir older than its registry registers
    its first generation (which bootstraps production). `asked` (`--production`, the
    RayService's `production` arg) must agree with the registry: it can only confirm."""
    prod = production_of(cfg, reg)
    if prod is None:
        raise NotTrained(f"no generation is in production in {reg.location}: train the first generation "
                         f"(`graceful train CONFIG --generation {cfg.generations[0].name}`), which becomes "
                         f"production")
    if asked is not None and asked != prod.name:
        raise ServeRequestError(f"production is {prod.name!r} in the registry ({reg.location}), not {asked!r}: the "
                                f"registry is the source of truth; change production with `graceful rollout` / "
                                f"`graceful promote`, or drop --production")
    return prod.name


@dataclass(frozen=True)
class ServingPlan:
    """What a router starts with: checkpoints (production first) and the traffic plan."""

    production: ModelRef
    candidates: tuple[ModelRef, ...]
    weights: dict
    shadows: tuple[str, ...]

    @property
    def refs(self) -> tuple[ModelRef, ...]:
        return (self.production, *self.candidates)


def serving_plan(cfg: RunConfig, reg: Registry, candidates: Sequence[str] = (),
                 production: Optional[str] = None, shadows: Optional[Sequence[str]] = None) -> ServingPlan:
    """Production from the registry, the asked candidates plus the active rollout's, and
    the plan the registry implies (`orchestrator.rollout.plan.registry_plan`)."""
    prod = production_name(cfg, reg, production)
    names = list(dict.fromkeys(candidates))
    if prod in names:
        # A candidate that was promoted since the manifest or the command was written: it
        # is served as production (a RayService upgrade after a promotion must build).
        log.warning("%s is production in the registry; serving it as production, not as a candidate", prod)
        names.remove(prod)
    active = reg.active_rollout()
    if active is not None:
        # A rollout in progress keeps its candidate served, and a guarding one (the
        # candidate production already) the previous production, its reference.
        for g in (active.candidate, active.baseline):
            if g not in names and g != prod:
                names.append(g)
    queries = [q for q in query_generations(cfg, reg) if q != prod and q not in names]
    asked = list(names) if shadows is None else [s for s in shadows if s in names]
    names += queries
    plan = plan_for(reg, prod, [prod, *names], asked)
    # (While guarding, the plan's production is the previous one and the registry's is
    # shadowed: the router takes that plan from the registry; these deploy-time arguments
    # are only its fallback, and production is never its own shadow.)
    return ServingPlan(generation_ref(cfg, reg, prod), tuple(generation_ref(cfg, reg, n) for n in names),
                       plan["weights"], tuple(s for s in plan["shadows"] if s != prod))


def query_generations(cfg: RunConfig, reg: Registry) -> list[str]:
    """`retrieval.query_generations` that are trained (the others are skipped, with a
    warning): attached to the router for requests that name them, never shadowed."""
    out = []
    for name in cfg.retrieval.query_generations:
        try:
            generation_ref(cfg, reg, name)
        except NotTrained as e:
            log.warning("query generation %s is not served: %s", name, e)
            continue
        out.append(name)
    return out


def plan_for(reg: Registry, production: str, attached: Sequence[str], shadows: Iterable[str]) -> dict:
    """The registry's plan over the `attached` generations (rolled-back or retired ones
    are not shadowed again)."""
    def ended(g: str) -> bool:
        rec = reg.generation(g)
        return rec is not None and rec.status in _NOT_SHADOWED

    keep = [s for s in shadows if s in attached and not ended(s)]
    return registry_plan(production, reg.active_rollout(), attached, keep)


class RegistryPlan:
    """Handed to the router: called at every replica start with the attached generation
    names, returns {production, weights, shadows} as the registry has them now. Picklable
    (a location and names), so Serve can ship it to a replica on any node that sees the
    run directory or reaches the PostgreSQL registry (whose password the replica reads
    from its own environment, `password_env`)."""

    def __init__(self, registry: str | Path, shadows: Sequence[str] = (), password_env: Optional[str] = None):
        self.registry = registry if is_url(registry) else str(Path(registry).resolve())
        self.shadows = tuple(shadows)
        self.password_env = password_env

    def __call__(self, attached: Sequence[str]) -> dict:
        # a replica never writes the registry
        with Registry(self.registry, readonly=True, password_env=self.password_env) as reg:
            prod = reg.production()
            if prod is None:
                raise RegistryError(f"no generation is in production in {reg.location}")
            return plan_for(reg, prod.name, list(attached), self.shadows)


def build_catalogue(cfg: RunConfig, reg: Registry, log: Optional[Callable[[str], None]] = None) -> Path:
    """The run's retrieval catalogue directory, embedded now by the gallery generation's
    verified model if it is not there yet (`orchestrator.catalogue.ensure_catalogue`)."""
    from orchestrator.catalogue import ensure_catalogue

    return ensure_catalogue(cfg, reg, lambda: generation_ref(cfg, reg, cfg.gallery), log)


def start_router(cfg: RunConfig, reg: Registry, plan: ServingPlan, catalogue: Optional[Path] = None,
                 spec: Any = None, admin_token: Optional[str] = None) -> str:
    """Deploy `plan` (from `serving_plan`) and the router on the connected Ray cluster
    (`serving.deploy.start_serving`), the router reading the registry's plan at every
    replica start; returns the router's base URL."""
    from serving.deploy import start_serving

    return start_serving(spec or cfg.serving, plan.production, list(plan.candidates),
                        catalogue=catalogue if catalogue is not None else build_catalogue(cfg, reg),
                        weights=plan.weights, shadows=list(plan.shadows),
                        admin_token=admin_token if admin_token is not None else cfg.serving.resolved_admin_token(),
                        plan_source=RegistryPlan(reg.location, plan.shadows, reg.password_env))


def attach_on_cluster(cfg: RunConfig, reg: Registry) -> Callable[[str], None]:
    """`attach(name)` for the rollout library and the controller: deploy generation `name`
    (the registry's checkpoint) beside the running router as a shadow and attach it
    (`serving.deploy.add_generation`), connecting to the Ray cluster that serves
    (`RAY_ADDRESS`, else the local one) on first use. With `serving.attach: rayservice`
    the application is added to the KubeRay RayService instead (`orchestrator.kuberay`)."""
    if cfg.serving.attach == "rayservice":
        from orchestrator.kuberay import attach_via_rayservice

        return attach_via_rayservice(cfg, reg)

    def attach(name: str) -> None:
        import ray

        from serving.deploy import add_generation

        if not ray.is_initialized():
            import os

            address = os.environ.get("RAY_ADDRESS") or "auto"
            try:
                init_ray(cfg, address=address)
            except Exception as e:
                raise RegistryError(f"cannot attach {name!r}: no Ray cluster to deploy it on at {address} "
                                    f"({type(e).__name__}: {e}); serve it with `graceful serve CONFIG "
                                    f"--candidate {name}` or set RAY_ADDRESS") from None
        add_generation(generation_ref(cfg, reg, name, actor="rollout"), cfg.serving, shadow=True)

    return attach


# --- RayService builders --------------------------------------------------------------------

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


def _names(builder: str, key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
        raise AppArgsError(f"{builder}: args.{key} must be a list of generation names, got {value!r}")
    return list(dict.fromkeys(value))


def generation_app(args: dict):
    """One generation's model deployment (`ModelServer`, options from `serving:`).

    args: {"config": path of the run config, "generation": name}.
    """
    from serving.deploy import generation_application

    cfg = _config("generation_app", args)
    name = args.get("generation")
    if not isinstance(name, str) or not name:
        raise AppArgsError(f"generation_app: a generation name must be a non-empty string, got {name!r}")
    with open_registry(cfg) as reg:
        try:
            ref = generation_ref(cfg, reg, name)
        except (ServeRequestError, NotTrained, RegistryError) as e:
            raise AppArgsError(f"generation_app: {e}") from None
    return generation_application(ref, cfg.serving)

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

    async def __init__(self, *args, app_names: tuple[str, ...] = (), wait_s: float = 600.0, **kwargs):
        await wait_for_apps(app_names, wait_s)
        await super().__init__(*args, **kwargs)


def router_app(args: dict):
    """The router ingress: the registry's production, each of `candidates` in shadow.

    args: {"config": path, "candidates": [names] (default none), "shadows": [names]
    (default: the candidates), "wait_s": seconds to wait for the generation applications
    (default 600), "production": optional, must equal the registry's production}.
    Production, the active rollout's candidate and its weight come from the registry;
    the retrieval catalogue is read from `retrieval.path` (embedded here by
    `gallery_generation` if it is not there yet); the admin token
    comes from `serving.admin_token` or the `serving.admin_token_env` variable.
    """
    from serving.deploy import router_application

    cfg = _config("router_app", args)
    candidates = _names("router_app", "candidates", args.get("candidates"))
    shadows = args.get("shadows")
    if shadows is not None:
        shadows = _names("router_app", "shadows", shadows)
        if not set(shadows) <= set(candidates):
            raise AppArgsError(f"router_app: args.shadows must be a list of candidates {candidates}, got {shadows!r}")
    wait_s = args.get("wait_s", 600.0)
    if not isinstance(wait_s, (int, float)) or wait_s <= 0:
        raise AppArgsError(f"router_app: args.wait_s must be a positive number, got {wait_s!r}")
    asked = args.get("production")
    if asked is not None and (not isinstance(asked, str) or not asked):
        raise AppArgsError(f"router_app: args.production must be a generation name, got {asked!r}")
    with open_registry(cfg) as reg:
        try:
            plan = serving_plan(cfg, reg, candidates, asked, shadows)
            catalogue = build_catalogue(cfg, reg)
        except (ServeRequestError, NotTrained, RegistryError, CatalogueError, DataError) as e:
            raise AppArgsError(f"router_app: {e}") from None
        source = RegistryPlan(reg.location, plan.shadows, reg.password_env)
    local = cfg.serving.in_router_models
    return router_application(
        cfg.serving, plan.production, list(plan.candidates), catalogue, plan.weights, list(plan.shadows),
        cfg.serving.resolved_admin_token(), router_cls=ClusterRouter,
        plan_source=source,
        app_names=() if local else tuple(r.app_name for r in plan.refs), wait_s=float(wait_s))
