"""Deploying generations and the router on Ray Serve (the side-effecting edge).

Each generation is its own Serve application (`ModelRef.app_name`, not exposed over HTTP)
running `ModelServer`; the router application (`ROUTER_APP`) is the only HTTP ingress.
Needs a connected Ray cluster (`ray.init`) in the calling process.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from ray import serve

from serving.local import describe, infer, probabilities, serving_device, warm_up
from serving.refs import ModelRef, app_name_for
from serving.specs import ServingSpec
from workers.checkpoint import CheckpointError, input_shape_of, load_model, model_file, read_checkpoint, sha256_file

ROUTER_APP = "graceful"
# Where a spec without `prediction_log_path` keeps its sqlite log (a run config sets it to
# <run_dir>/predictions.sqlite; this is the default run_dir's).
DEFAULT_LOG_PATH = "runs/default/predictions.sqlite"

# Called by each router replica as it starts, with the attached generation names; returns
# {"production": name, "weights": {name: share}, "shadows": [names]}. Serving defines the
# shape; the control plane supplies it (orchestrator.apps.RegistryPlan).
PlanSource = Callable[[list], dict]


class ModelServer:
    """One generation: its verified checkpoint, batched across requests.

    `inject_fault` is for fault drills only: {"error": true} makes every prediction raise,
    {"delay_s": s} makes it that much slower.
    """

    def __init__(self, ref: ModelRef, max_batch_size: int, batch_wait_timeout_s: float,
                 inject_fault: Optional[dict] = None, gpus: float = 0):
        import torch

        # Replicas share two cores with everything else; intra-op threads only contend.
        torch.set_num_threads(1)
        self.ref = ref
        self.device = serving_device(gpus)
        # Raises: never served unverified, nor built by a factory other than the config's.
        self.model, self.meta = load_model(ref.uri, ref.sha256, factory=ref.factory)
        self.model.to(self.device)
        warm_up(self.model, self.device)  # ready only once the first (slow) call is behind it
        self.fault = dict(inject_fault or {})
        for method in (self.predict, self.embed):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _run(self, xs: list[np.ndarray], fn) -> list[np.ndarray]:
        sizes = [len(x) for x in xs]
        return np.split(infer(fn, np.concatenate(xs), self.device), np.cumsum(sizes)[:-1])

    async def _fault(self) -> None:
        if self.fault.get("delay_s"):
            import asyncio

            await asyncio.sleep(float(self.fault["delay_s"]))
        if self.fault.get("error"):
            raise RuntimeError(f"injected fault in generation {self.ref.name}")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def predict(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Class probabilities, (rows, classes) float32 per request."""
        await self._fault()
        return self._run(xs, probabilities(self.model))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def embed(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Retrieval embeddings, (rows, dim) float32 per request."""
        await self._fault()
        return self._run(xs, self.model.embed)

    def info(self) -> dict[str, Any]:
        return describe(self.ref, self.model)


def verify(ref: ModelRef) -> None:
    """Fail fast in the caller when a checkpoint is missing or changed (the replica checks again)."""
    try:
        actual = sha256_file(model_file(ref.uri))
    except OSError as e:
        raise CheckpointError(f"{ref.name}: checkpoint {ref.uri} cannot be read ({e})") from None
    if actual != ref.sha256:
        raise CheckpointError(f"{ref.name}: checkpoint {ref.uri} has sha256 {actual[:12]}..., "
                              f"recorded {ref.sha256[:12]}...; refusing to serve it")


def generation_application(ref: ModelRef, spec: ServingSpec, inject_fault: Optional[dict] = None):
    """The Serve application of one generation (not started): its verified checkpoint in a
    batched `ModelServer`, replicas and CPUs from `spec`. Shared by `deploy_generation` and
    the RayService builders (orchestrator/apps.py)."""
    verify(ref)
    dep = serve.deployment(ModelServer).options(
        name="model", num_replicas=spec.replicas, max_ongoing_requests=spec.max_ongoing_requests,
        ray_actor_options={"num_cpus": spec.cpus_per_replica, "num_gpus": spec.gpus_per_replica})
    return dep.bind(ref, spec.max_batch_size, spec.batch_wait_timeout_s, inject_fault, spec.gpus_per_replica)


def router_application(spec: ServingSpec, production: ModelRef, candidates: Sequence[ModelRef] = (),
                       catalogue: Optional[str | Path] = None, weights: Optional[dict[str, float]] = None,
                       shadows: Optional[Sequence[str]] = None, admin_token: Optional[str] = None,
                       router_cls: type = None, plan_source: Optional[PlanSource] = None,
                       feedback_token: Optional[str] = None, **router_kwargs):
    """The router ingress application (not started) over `production` and `candidates`.

    Defaults: production takes all traffic, every candidate shadows. `plan_source`, when
    given, is called by every replica as it starts (with the attached generation names)
    and its plan replaces these defaults: the control plane's source of truth, read
    again after a restart. `router_cls` (a `Router` subclass) and `router_kwargs` let a
    cluster builder wait for its generations.

    The router takes production's input shape; a candidate recording another one is
    refused here (CheckpointError), as `Router.attach` refuses it later.
    """
    from serving.router import Router

    model, _ = load_model(production.uri, production.sha256, factory=production.factory)
    refs = [production, *candidates]
    for ref in refs:
        verify(ref)
    for ref in candidates:
        shape = input_shape_of(read_checkpoint(ref.uri, ref.sha256)[1])
        if shape != tuple(model.input_shape):
            raise CheckpointError(f"{ref.name}: takes inputs of shape {list(shape)}, production {production.name} "
                                  f"{list(model.input_shape)}; a candidate must take production's input shape")
    if spec.prediction_log == "sqlite" and not spec.prediction_log_path:
        # A bare spec (no run config to put it under run_dir): the run config's default
        # run_dir, resolved here, in the caller's working directory, not in a replica's.
        spec = spec.model_copy(update={"prediction_log_path": str(Path(DEFAULT_LOG_PATH).resolve())})
    router = serve.deployment(router_cls or Router).options(
        name="router", num_replicas=spec.router_replicas, max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": spec.router_cpus})
    return router.bind(
        spec.model_dump(mode="json"), tuple(model.input_shape), production.name,
        {r.name: {"app": None if spec.in_router_models else r.app_name, "sha256": r.sha256, "uri": r.uri,
                  "factory": r.factory} for r in refs},
        weights or {production.name: 1.0},
        list(shadows) if shadows is not None else [c.name for c in candidates],
        str(catalogue) if catalogue is not None else None, admin_token, plan_source=plan_source,
        feedback_token=feedback_token if feedback_token is not None else spec.resolved_feedback_token(),
        deployment_id=uuid.uuid4().hex, **router_kwargs)


def deploy_generation(ref: ModelRef, spec: ServingSpec, inject_fault: Optional[dict] = None) -> str:
    """Deploy `ref` as its own Serve application; returns the application name."""
    serve.run(generation_application(ref, spec, inject_fault), name=ref.app_name, route_prefix=None)
    return ref.app_name


def start_serving(spec: ServingSpec, production: ModelRef, candidates: Sequence[ModelRef] = (),
                  catalogue: Optional[str | Path] = None, weights: Optional[dict[str, float]] = None,
                  shadows: Optional[Sequence[str]] = None, admin_token: Optional[str] = None,
                  app_name: str = ROUTER_APP, route_prefix: str = "/",
                  plan_source: Optional[PlanSource] = None, feedback_token: Optional[str] = None) -> str:
    """Start Serve on spec.host:spec.port, deploy every generation and the router.

    Defaults: production takes all traffic, every candidate shadows. With
    `spec.in_router_models` the generations load inside the router (no model apps).
    The feedback token defaults to the spec's (`resolved_feedback_token`).
    Returns the base URL of the router.
    """
    serve.start(http_options={"host": spec.host, "port": spec.port})
    if not spec.in_router_models:
        for ref in (production, *candidates):
            deploy_generation(ref, spec)
    serve.run(router_application(spec, production, candidates, catalogue, weights, shadows, admin_token,
                                 plan_source=plan_source, feedback_token=feedback_token),
              name=app_name, route_prefix=route_prefix)
    return spec.base_url() + route_prefix.rstrip("/")


def router_handle():
    return serve.get_app_handle(ROUTER_APP)


def add_generation(ref: ModelRef, spec: ServingSpec, shadow: bool = True,
                   inject_fault: Optional[dict] = None) -> dict[str, Any]:
    """Deploy a candidate next to the running router and attach it (weight 0, shadow by
    default). Returns the new traffic plan. A checkpoint failing verification is never
    deployed."""
    if spec.in_router_models:
        verify(ref)
        return router_handle().attach_local.remote(ref, shadow).result()
    app_name = deploy_generation(ref, spec, inject_fault)
    try:
        return router_handle().attach.remote(ref.name, app_name, ref.sha256, shadow).result()
    except Exception:
        serve.delete(app_name)
        raise


def remove_generation(name: str) -> dict[str, Any]:
    """Detach a generation from the router (it must serve no traffic), then delete its app."""
    plan = router_handle().detach.remote(name).result()
    if app_name_for(name) in serve.status().applications:
        serve.delete(app_name_for(name))
    return plan


def stop_serving() -> None:
    """Shut Serve down: the router and every generation application."""
    serve.shutdown()
