"""The one owner of the run-directory layout.

    run_dir/
      registry.sqlite           the registry (lineage, evaluations, rollouts, leases, audit),
                                unless `registry.url` puts it in PostgreSQL
      generations/<name>/       what training wrote: model.pt (workers.checkpoint), metrics.json,
                                cached constraint outputs (workers.train)
      reports/<name>.md, *.png  offline evaluation reports
      ray/                      Ray Train's storage (checkpoints of runs in progress)
      summary.json              the demo's summary

Every path handed to another process (Ray workers, tasks, Serve replicas) is absolute:
their working directory is not ours. `orchestrator.config` makes `run_dir` absolute at
load; these helpers resolve again for configs built in code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from workers.checkpoint import METRICS_FILE, MODEL_FILE

REGISTRY_FILE = "registry.sqlite"


def root(cfg: Any) -> Path:
    return Path(cfg.run_dir).resolve()


def registry_path(cfg: Any) -> Path:
    """Where the registry of a run lives: `run_dir/registry.sqlite`."""
    return root(cfg) / REGISTRY_FILE


def registry_location(cfg: Any) -> str | Path:
    """The registry a run uses: `registry.url` (a PostgreSQL database) when the config sets
    one, else `registry_path(cfg)`."""
    url = getattr(getattr(cfg, "registry", None), "url", None)
    return url if url else registry_path(cfg)


def has_registry(cfg: Any) -> bool:
    """Whether the run may have a registry yet: always with `registry.url` (the database
    says), else when `registry_path(cfg)` is a file."""
    return bool(getattr(getattr(cfg, "registry", None), "url", None)) or registry_path(cfg).is_file()


def generation_dir(cfg: Any, name: str) -> Path:
    return root(cfg) / "generations" / name


def model_file(cfg: Any, name: str) -> Path:
    return generation_dir(cfg, name) / MODEL_FILE


def reports_dir(cfg: Any) -> Path:
    return root(cfg) / "reports"


def ray_storage(cfg: Any) -> Path:
    return root(cfg) / "ray"


def summary_path(cfg: Any) -> Path:
    return root(cfg) / "summary.json"


def read_metrics(cfg: Any, name: str) -> Optional[dict]:
    """The metrics.json training left for `name`, or None when it is not trained (no
    model.pt and metrics.json)."""
    d = generation_dir(cfg, name)
    if not (d / MODEL_FILE).is_file() or not (d / METRICS_FILE).is_file():
        return None
    return json.loads((d / METRICS_FILE).read_text())
