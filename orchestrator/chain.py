"""The chain of generations on disk, and turning one generation of it into a training job.

Constraints of generation k (see DESIGN.md and shared/notes/compat-experiments.md):
the production model (its parent in the chain) for Focal Distillation and LQF, and for
BCT either production alone or every ancestor with importance decay**distance; the model
whose embeddings fill the served gallery is always among the BCT constraints, because
compatibility is not transitive.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable, Optional

from orchestrator.config import RunConfig
from workers.losses import ancestor_importances
from workers.train import ConstraintModel, TrainJob, TrainResult, run_training


class ChainError(RuntimeError):
    """The chain is not in a state that allows the asked action (e.g. parent untrained)."""


def generation_dir(cfg: RunConfig, name: str) -> Path:
    return Path(cfg.run_dir) / "generations" / name


def read_metrics(cfg: RunConfig, name: str) -> Optional[dict]:
    """The metrics.json `graceful train` left for `name`, or None when it is not trained."""
    d = generation_dir(cfg, name)
    if not (d / "model.pt").is_file() or not (d / "metrics.json").is_file():
        return None
    return json.loads((d / "metrics.json").read_text())


def training_hash(cfg: RunConfig, name: str) -> str:
    """sha256 of what determines generation `name`'s weights: the data, the gallery model
    and the specs of `name` and every generation before it (its constraints). Serving,
    rollout, gates, scaling and run_dir are left out, so changing them never retrains
    (DDP over any number of workers trains on the same global batches)."""
    names = [g.name for g in cfg.generations]
    prefix = cfg.generations[: names.index(name) + 1]
    blob = {"data": cfg.data.model_dump(mode="json"), "gallery": cfg.gallery,
            "generations": [g.model_dump(mode="json") for g in prefix]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def trained_with_this_config(cfg: RunConfig, name: str) -> Optional[dict]:
    """metrics.json of `name` when it was trained with what this config says, else None."""
    m = read_metrics(cfg, name)
    return m if m is not None and m.get("training_hash") == training_hash(cfg, name) else None


def next_untrained(cfg: RunConfig) -> Optional[str]:
    for g in cfg.generations:
        if read_metrics(cfg, g.name) is None:
            return g.name
    return None


def _constraint(cfg: RunConfig, name: str, importance: float = 1.0) -> ConstraintModel:
    m = read_metrics(cfg, name)
    if m is None:
        raise ChainError(f"generation {name!r} is not trained yet (no checkpoint under "
                         f"{generation_dir(cfg, name)}); run `graceful train CONFIG --generation {name}` first")
    return ConstraintModel(name, str(generation_dir(cfg, name)), m["sha256"], importance)


def constraint_names(cfg: RunConfig, name: str) -> list[tuple[str, float]]:
    """(ancestor name, BCT importance) pairs for generation `name`."""
    names = [g.name for g in cfg.generations]
    k = names.index(name)
    gen = cfg.generation(name)
    if k == 0 or gen.compat.bct is None:
        return []
    if gen.compat.bct.against == "production":
        picked = [names[k - 1]]
        if cfg.gallery in names[:k] and cfg.gallery not in picked:
            picked.append(cfg.gallery)
        distances = [k - names.index(n) for n in picked]
    else:
        picked = names[:k][::-1]  # parent first
        distances = list(range(1, k + 1))
    return list(zip(picked, ancestor_importances(distances, gen.compat.bct.decay)))


def embed_dim_problems(cfg: RunConfig, name: str) -> list[str]:
    """Why generation `name` cannot be trained through its BCT models' heads, if it cannot:
    their embedding sizes must equal its own (we refuse rather than learn a projection,
    which would change what the gallery compares)."""
    names = [g.name for g in cfg.generations]
    gen = cfg.generation(name)
    out = []
    for other, _ in constraint_names(cfg, name):
        dim = cfg.generation(other).arch.embed_dim
        if dim != gen.arch.embed_dim:
            out.append(f"generations[{names.index(name)}].arch.embed_dim: {gen.arch.embed_dim}, but BCT against "
                       f"{other!r} needs {dim} (its arch.embed_dim); make them equal or drop compat.bct")
    return out


def build_job(cfg: RunConfig, name: str, verbose: bool = True) -> TrainJob:
    """The training job of generation `name`: its specs, constraints and where to write.
    Raises ValueError when its embedding cannot be scored by its BCT heads."""
    gen = cfg.generation(name)
    problems = embed_dim_problems(cfg, name)
    if problems:
        raise ValueError("; ".join(problems))
    parent = cfg.parent_of(name)
    production = _constraint(cfg, parent.name) if parent is not None else None
    bct = tuple(_constraint(cfg, n, w) for n, w in constraint_names(cfg, name))
    run_dir = Path(cfg.run_dir).resolve()
    return TrainJob(
        generation=gen, data=cfg.data, scaling=cfg.scaling,
        out_dir=str(generation_dir(cfg, name).resolve()),
        storage_path=cfg.scaling.storage_path or str(run_dir / "ray"),
        # The training hash in the name: a changed recipe never resumes a stale run.
        run_name=f"{name}-{training_hash(cfg, name)[:10]}",
        config_hash=cfg.config_hash(), training_hash=training_hash(cfg, name),
        production=production, bct=bct, verbose=verbose,
    )


def _run_interruptibly(job: TrainJob, log: Callable[[str], None]) -> TrainResult:
    """run_training, with Ctrl-C surfacing as KeyboardInterrupt.

    Ray Train installs its own SIGINT handler for the run (it aborts the workers, then the
    blocked `ray.get` raises SystemExit(1)) and leaves it installed: we turn that exit back
    into an interrupt and restore the caller's handler, so a later Ctrl-C works too.
    """
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main else None
    try:
        return run_training(job, log)
    except SystemExit:
        raise KeyboardInterrupt(f"training of {job.generation.name} interrupted; the same command resumes it "
                                f"from its last checkpoint") from None
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def check_retrainable(cfg: RunConfig, name: str) -> None:
    """Raise ChainError when the registry serves generation `name` (production, shadow,
    canary, or named by an active rollout): training would overwrite the bytes being
    served and could not be recorded anyway. Asked before any training starts."""
    from orchestrator.registry.store import Registry, RegistryError, registry_path

    path = registry_path(cfg)
    if not path.is_file():
        return  # no registry yet: nothing is served
    with Registry(path) as reg:
        try:
            reg.check_replaceable(name)
        except RegistryError as e:
            raise ChainError(str(e)) from None


def train_generation(cfg: RunConfig, name: str, log: Callable[[str], None] = print,
                     job: Optional[TrainJob] = None, fresh: bool = False) -> TrainResult:
    """Train generation `name` on Ray Train (starting a local Ray if none is running).

    An interrupted run of the same config resumes from its last checkpoint unless `fresh`.
    The trained generation is recorded in the registry (`orchestrator.registry.record_trained`).
    Raises ChainError before training when the registry serves `name` (`check_retrainable`).
    """
    import ray

    check_retrainable(cfg, name)
    job = job or build_job(cfg, name)
    stale = Path(job.storage_path) / job.run_name
    if fresh and stale.is_dir():
        shutil.rmtree(stale)
    if not ray.is_initialized():
        # Workers' progress comes through a queue; Ray's own worker logs stay in its log files.
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    result = _run_interruptibly(job, log)
    from orchestrator.registry.store import record_trained  # lineage, sha256, metrics; bootstraps production

    record_trained(cfg, name, actor="train")
    return result
