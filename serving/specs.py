"""Typed configuration of the serving data plane (router, model deployments, gallery)."""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from workers.specs import StrictModel


class RayServiceSpec(StrictModel):
    """Where `serving.attach: rayservice` adds generation applications: the KubeRay
    RayService whose serveConfigV2 lists them, edited through the Kubernetes API with the
    pod's service account (deploy/kuberay/orchestrator.yaml grants exactly that)."""

    name: str = Field("graceful", pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
    # None: the namespace of the pod (its service account's namespace file).
    namespace: Optional[str] = Field(None, pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    api_url: str = Field("https://kubernetes.default.svc", pattern=r"^https?://")
    # The run config's path inside the RayService's pods (the builders' `config` arg).
    config_path: str = Field("/config/run.yaml", min_length=1)
    ready_timeout_s: float = Field(600.0, gt=0, description="wait for a new application to run")


class ServingSpec(StrictModel):
    """Router ingress and per-generation model deployments on Ray Serve."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Bearer token of /v1/admin/*: read from this environment variable when `admin_token`
    # is not set; admin routes refuse every request when neither gives a token.
    admin_token: Optional[str] = Field(None, min_length=8)
    admin_token_env: str = "GRACEFUL_ADMIN_TOKEN"
    replicas: int = Field(1, ge=1, description="replicas per model deployment")
    cpus_per_replica: float = Field(0.25, gt=0)
    max_batch_size: int = Field(32, ge=1, description="@serve.batch size across requests")
    batch_wait_timeout_s: float = Field(0.002, ge=0)
    max_rows: int = Field(256, ge=1, description="rows per request")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    shadow_timeout_s: float = Field(1.0, gt=0)
    # The prediction log (serving/predlog): where answered requests' predictions wait for
    # their labels and where the live counters are kept.
    prediction_log: Literal["memory", "sqlite", "redis"] = "sqlite"
    # The sqlite file; a run config sets it to <run_dir>/predictions.sqlite when unset.
    prediction_log_path: Optional[str] = None
    redis_url: Optional[str] = Field(None, description="redis://host:port/db of the redis log")
    redis_url_env: str = "GRACEFUL_REDIS_URL"
    redis_prefix: str = Field("graceful", pattern=r"^[A-Za-z0-9_.:-]+$", description="key prefix in Redis")
    prediction_retention_s: float = Field(7 * 86400.0, gt=0, description="how long predictions wait for labels")
    prediction_log_max_bytes: int = Field(1 << 30, ge=1 << 16, description="bytes the memory or sqlite log keeps")
    # Answers wait for their log row's commit (a group commit shared by concurrent
    # requests): an answered request is never missing from the log after a crash.
    prediction_log_sync: bool = True
    # Bearer token of /v1/feedback*: like the admin token, from `feedback_token` or the
    # environment variable `feedback_token_env`; feedback is refused when neither is set.
    feedback_token: Optional[str] = Field(None, min_length=8)
    feedback_token_env: str = "GRACEFUL_FEEDBACK_TOKEN"
    feedback_max_items: int = Field(10_000, ge=1, description="labelled requests per /v1/feedback/batch call")
    # Fusion: answer with (1-w)*old + w*new probabilities; None disables it.
    fusion_weight: Optional[float] = Field(None, ge=0, le=1)
    search_top_k: int = Field(5, ge=1, le=100)
    # How often a router replica looks at the catalogue's manifest for a new version
    # (items added): at most this old, then reloaded off the event loop.
    catalogue_refresh_s: float = Field(5.0, gt=0, description="seconds between checks for catalogue changes")
    shadow_batch_wait_s: float = Field(0.005, ge=0, le=1, description="window that coalesces shadow copies into one call")
    shadow_max_inflight: int = Field(256, ge=1, description="mirrored requests in flight before shadows are dropped")
    latency_window: int = Field(2048, ge=16, description="recent calls per generation behind the status quantiles")
    # Calls slower than this are counted (timed_calls, slow_calls per generation): the
    # rollout's latency test. A run config sets it to rollout.latency_p99_ms when unset.
    slow_call_ms: Optional[float] = Field(None, gt=0)
    router_cpus: float = Field(0.5, gt=0, description="CPUs reserved for each router replica")
    router_replicas: int = Field(1, ge=1, description="router replicas (sqlite or redis log when more than 1)")
    gpus_per_replica: float = Field(0, ge=0, description="GPUs per model replica (Ray num_gpus)")
    # Host the models inside the router replica (no handle hop): small models only, as
    # inference then runs on the router's event loop. Off: one Serve app per generation.
    in_router_models: bool = False
    max_ongoing_requests: int = Field(64, ge=1, description="per model replica; lets @serve.batch fill")
    # How a candidate's application reaches the serving cluster: `ray` deploys it with
    # Ray Serve on the cluster this process is connected to (RAY_ADDRESS, else local);
    # `rayservice` adds it to a KubeRay RayService's serveConfigV2 (`rayservice`), for an
    # orchestrator that runs as its own RayJob beside the RayService.
    attach: Literal["ray", "rayservice"] = "ray"
    rayservice: RayServiceSpec = Field(default_factory=RayServiceSpec)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            gone = {"feedback_ttl_s": "prediction_retention_s", "feedback_max_entries": "prediction_log_max_bytes"}
            for old, new in gone.items():
                if old in data:
                    raise ValueError(f"{old}: replaced by serving.{new} (the prediction log keeps labels "
                                     f"joinable by age and bytes)")
        return data

    @model_validator(mode="after")
    def _replicas_share_a_log(self) -> "ServingSpec":
        if self.router_replicas > 1 and self.prediction_log == "memory":
            raise ValueError("router_replicas: more than one router replica needs a shared prediction log "
                             "(prediction_log: sqlite on one node, or redis)")
        if self.attach == "rayservice" and self.in_router_models:
            raise ValueError("attach: rayservice adds each generation as its own RayService application; "
                             "in_router_models (models inside the router) cannot be attached that way")
        if self.prediction_log == "redis" and not self.resolved_redis_url():
            raise ValueError(f"redis_url: the redis prediction log needs redis_url (or the environment "
                             f"variable {self.redis_url_env})")
        return self

    def base_url(self) -> str:
        """The router's URL at `host:port` (where it binds, and where clients on this host reach it)."""
        return f"http://{self.host}:{self.port}"

    def resolved_admin_token(self) -> Optional[str]:
        """The admin bearer token: `admin_token`, else the `admin_token_env` variable, else None (admin off)."""
        return self.admin_token or os.environ.get(self.admin_token_env) or None

    def resolved_feedback_token(self) -> Optional[str]:
        """The feedback bearer token: `feedback_token`, else the `feedback_token_env` variable, else None (feedback off)."""
        return self.feedback_token or os.environ.get(self.feedback_token_env) or None

    def resolved_redis_url(self) -> Optional[str]:
        return self.redis_url or os.environ.get(self.redis_url_env) or None
