"""Typed configuration of the serving data plane (router, model deployments, gallery)."""

from __future__ import annotations

import os
from typing import Optional

from pydantic import Field

from workers.specs import StrictModel


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
    feedback_ttl_s: float = Field(3600.0, gt=0, description="how long predictions wait for labels")
    feedback_max_entries: int = Field(100_000, ge=1, description="cap of the feedback join store")
    # Fusion: answer with (1-w)*old + w*new probabilities; None disables it.
    fusion_weight: Optional[float] = Field(None, ge=0, le=1)
    search_top_k: int = Field(5, ge=1, le=100)
    shadow_batch_wait_s: float = Field(0.005, ge=0, le=1, description="window that coalesces shadow copies into one call")
    shadow_max_inflight: int = Field(256, ge=1, description="mirrored requests in flight before shadows are dropped")
    latency_window: int = Field(2048, ge=16, description="recent calls per generation behind the status quantiles")
    router_cpus: float = Field(0.5, gt=0, description="CPUs reserved for the router replica")
    # Host the models inside the router replica (no handle hop): small models only, as
    # inference then runs on the router's event loop. Off: one Serve app per generation.
    in_router_models: bool = False
    max_ongoing_requests: int = Field(64, ge=1, description="per model replica; lets @serve.batch fill")

    def resolved_admin_token(self) -> Optional[str]:
        """The admin bearer token: `admin_token`, else the `admin_token_env` variable, else None (admin off)."""
        return self.admin_token or os.environ.get(self.admin_token_env) or None
