"""Which generation to train next, against which older models, and turning it into a
training job. The constraints come from the registry, never from the YAML's order:

- the parent (Focal Distillation target, LQF's linearisation point, the lineage's parent)
  is the generation in production when the new one is trained;
- BCT constrains the new embedding against every generation that was ever production
  (`compat.bct.against: ancestors`, importance decay**distance, distance 1 = production),
  or production alone (`against: production`), plus always the generation whose
  embeddings fill the served gallery, since compatibility is not transitive;
- rejected and rolled-back generations are never parents, ancestors or targets (a
  generation in either state is skipped wherever it appears).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from orchestrator.config import RunConfig, init_ray
from orchestrator.registry import (EXCLUDED_FROM_LINEAGE, Registry, RegistryError, open_registry, production_of,
                                   register_trained)
from orchestrator.rundir import generation_dir, has_registry, model_file, ray_storage, read_metrics
from workers.checkpoint import expected_factory, sha256_file
from workers.losses import ancestor_importances
from workers.train import ConstraintModel, TrainJob, TrainResult, clear_caches, run_training


class ChainError(RuntimeError):
    """The chain is not in a state that allows the asked action (e.g. nothing in production)."""


@dataclass(frozen=True)
class Constraints:
    """What generation `name` is trained against, read from the registry."""

    name: str
    production: Optional[ConstraintModel]        # the parent: FD target, LQF linearisation point
    bct: tuple[ConstraintModel, ...] = ()        # BCT heads with their importances

    @property
    def parent(self) -> Optional[str]:
        return self.production.name if self.production is not None else None


def expected_factory_of(cfg: RunConfig, name: str) -> Optional[str]:
    """The model factory the config expects generation `name`'s checkpoint to record
    (`workers.checkpoint.expected_factory`); None when the config no longer lists it."""
    try:
        return expected_factory(cfg.generation(name).arch)
    except KeyError:
        return None


def _constraint(cfg: RunConfig, reg: Registry, name: str, importance: float = 1.0) -> ConstraintModel:
    rec = reg.generation(name)
    if rec is None:
        raise ChainError(f"generation {name!r} is not registered; train it first")
    return ConstraintModel(name, rec.checkpoint_uri, rec.sha256, importance, expected_factory_of(cfg, name))


def _production_for(cfg: RunConfig, reg: Registry, name: str) -> Optional[str]:
    """The generation `name` is trained against: production now. None for the first
    generation of the config, which is never constrained (retrained, it gets no parent)."""
    first = cfg.generations[0].name
    if name == first:
        return None
    prod = production_of(cfg, reg)
    if prod is None:
        raise ChainError(f"no generation is in production yet, so {name!r} has nothing to be trained against: "
                         f"run `graceful train CONFIG --generation {first}` first (the first generation "
                         f"trained becomes production)")
    return prod.name if prod.name != name else None


def ancestors(cfg: RunConfig, reg: Registry, name: str) -> list[str]:
    """BCT ancestors of `name`, nearest first: every generation ever in production (most
    recent first), then the gallery's generation if it is not among them; never `name`
    itself, a rejected or rolled-back generation, or an unregistered one."""
    out = [n for n in reversed(reg.ever_production()) if n != name]
    if cfg.gallery not in out and cfg.gallery != name:
        out.append(cfg.gallery)
    keep = []
    for n in out:
        rec = reg.generation(n)
        if rec is not None and rec.status not in EXCLUDED_FROM_LINEAGE:
            keep.append(n)
    return keep


def constraint_names(cfg: RunConfig, reg: Registry, name: str) -> list[tuple[str, float]]:
    """(ancestor name, BCT importance) pairs for generation `name`, from the registry."""
    return _bct_names(cfg, reg, name, _production_for(cfg, reg, name))


def _bct_names(cfg: RunConfig, reg: Registry, name: str, parent: Optional[str]) -> list[tuple[str, float]]:
    gen = cfg.generation(name)
    if gen.compat.bct is None or parent is None:
        return []
    anc = ancestors(cfg, reg, name)
    if gen.compat.bct.against == "production":
        picked = [n for n in anc if n in (parent, cfg.gallery)]
    else:
        picked = anc
    distances = [anc.index(n) + 1 for n in picked]
    return list(zip(picked, ancestor_importances(distances, gen.compat.bct.decay)))


def constraints_of(cfg: RunConfig, reg: Registry, name: str) -> Constraints:
    """The parent and the BCT constraints generation `name` would be trained against now."""
    parent = _production_for(cfg, reg, name)
    return Constraints(name, _constraint(cfg, reg, parent) if parent is not None else None,
                       tuple(_constraint(cfg, reg, n, w) for n, w in _bct_names(cfg, reg, name, parent)))


def embed_dim_problems(cfg: RunConfig, reg: Registry, name: str,
                       bct: Optional[Sequence[str]] = None) -> list[str]:
    """Why generation `name` cannot be trained through its BCT models' heads (`bct`, by
    default those the registry gives it now), if it cannot: their embedding sizes must
    equal its own (we refuse rather than learn a projection, which would change what the
    gallery compares)."""
    names = [g.name for g in cfg.generations]
    gen = cfg.generation(name)
    out = []
    for other in (bct if bct is not None else [n for n, _ in constraint_names(cfg, reg, name)]):
        try:
            arch = cfg.generation(other).arch
        except KeyError:
            continue  # a registered generation this config no longer lists: its checkpoint says
        if "custom" in (arch.type, gen.arch.type):
            continue  # a factory's embedding size is known once it is built: build_targets checks it
        if arch.embed_dim != gen.arch.embed_dim:
            dim = arch.embed_dim
            out.append(f"generations[{names.index(name)}].arch.embed_dim: {gen.arch.embed_dim}, but BCT against "
                       f"{other!r} needs {dim} (its arch.embed_dim); make them equal or drop compat.bct")
    return out


def training_hash(cfg: RunConfig, name: str, constraints: Constraints) -> str:
    """sha256 of what determines generation `name`'s weights: the data, the gallery's
    generation, `name`'s spec and the exact models it is constrained against (names,
    sha256s, importances). Serving, rollout, gates, scaling and run_dir are left out, so
    changing them never retrains (DDP over any number of workers trains on the same
    global batches). Neither do the data keys that only say where generated samples are
    cached or how many held-out rows a stream reads into memory."""
    p = constraints.production
    blob = {"data": cfg.data.model_dump(mode="json", exclude={"cache_dir", "eval_rows"}), "gallery": cfg.gallery,
            "generation": cfg.generation(name).model_dump(mode="json"),
            "production": [p.name, p.sha256] if p is not None else None,
            "bct": [[c.name, c.sha256, round(c.importance, 12)] for c in constraints.bct]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def recorded_constraints(cfg: RunConfig, reg: Registry, name: str, metrics: dict) -> Optional[Constraints]:
    """The constraints generation `name` was trained against, from its metrics.json and
    the registry (None when a model it names is not registered any more)."""
    parent = metrics.get("parent")
    prod = None
    if parent is not None:
        rec = reg.generation(parent)
        if rec is None:
            return None
        prod = ConstraintModel(parent, rec.checkpoint_uri, rec.sha256, factory=expected_factory_of(cfg, parent))
    bct = []
    for c in metrics.get("constraints", []):
        if c.get("kind") != "bct":
            continue
        rec = reg.generation(c["name"])
        if rec is None or rec.sha256 != c["sha256"]:
            return None  # a BCT model that was replaced or forgotten since
        bct.append(ConstraintModel(c["name"], rec.checkpoint_uri, c["sha256"], float(c["importance"]),
                                   expected_factory_of(cfg, c["name"])))
    return Constraints(name, prod, tuple(bct))


def _recipe_of(cfg: RunConfig, name: str) -> Optional[str]:
    """The recipe generation `name` was trained with (its metrics.json)."""
    m = read_metrics(cfg, name)
    return m.get("recipe") if m is not None else None


def trained_with_this_config(cfg: RunConfig, name: str, reg: Optional[Registry] = None) -> Optional[dict]:
    """metrics.json of `name` when it was trained with what this config says, against
    models the registry still holds with the same bytes, and its model.pt still has the
    bytes training recorded (a crash between the two files means: not trained); else None."""
    m = read_metrics(cfg, name)
    if m is None or sha256_file(model_file(cfg, name)) != m.get("sha256"):
        return None
    own = reg or open_registry(cfg)
    try:
        c = recorded_constraints(cfg, own, name, m)
        return m if c is not None and m.get("training_hash") == training_hash(cfg, name, c) else None
    finally:
        if reg is None:
            own.close()


def next_untrained(cfg: RunConfig) -> Optional[str]:
    for g in cfg.generations:
        if read_metrics(cfg, g.name) is None:
            return g.name
    return None


def build_job(cfg: RunConfig, name: str, verbose: bool = True, registry: Optional[Registry] = None) -> TrainJob:
    """The training job of generation `name`: its spec, the constraints the registry
    gives it now, and where to write (absolute paths: Ray workers run elsewhere). Raises
    ChainError when it has nothing to be trained against, ValueError when its embedding
    cannot be scored by its BCT heads."""
    gen = cfg.generation(name)
    reg = registry or open_registry(cfg)
    try:
        c = constraints_of(cfg, reg, name)
        problems = embed_dim_problems(cfg, reg, name, [m.name for m in c.bct])
        if problems:
            raise ValueError("; ".join(problems))
    finally:
        if registry is None:
            reg.close()
    if gen.recipe == "lqf" and c.production is None:
        raise ChainError(f"{name}: recipe lqf fine-tunes the production model, and none is in production")
    if gen.recipe == "lqf" and _recipe_of(cfg, c.production.name) == "lqf":
        raise ChainError(f"{name}: recipe lqf linearises a plain network around its weights, but production "
                         f"{c.production.name!r} is itself an LQF generation; use recipe standard for {name}")
    h = training_hash(cfg, name, c)
    return TrainJob(
        generation=gen, data=cfg.data, scaling=cfg.scaling,
        out_dir=str(generation_dir(cfg, name)),
        storage_path=cfg.scaling.storage_path or str(ray_storage(cfg)),
        # The training hash in the name: a changed recipe or constraint never resumes a stale run.
        run_name=f"{name}-{h[:10]}",
        config_hash=cfg.config_hash(), training_hash=h,
        production=c.production, bct=c.bct, verbose=verbose,
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
    if not has_registry(cfg):
        return  # no registry yet: nothing is served
    with open_registry(cfg) as reg:
        try:
            reg.check_replaceable(name)
        except RegistryError as e:
            raise ChainError(str(e)) from None


def train_generation(cfg: RunConfig, name: str, log: Callable[[str], None] = print,
                     job: Optional[TrainJob] = None, fresh: bool = False) -> TrainResult:
    """Train generation `name` on Ray Train (starting a local Ray if none is running).

    An interrupted run of the same config resumes from its last checkpoint unless `fresh`.
    The trained generation is recorded in the registry (`orchestrator.registry.register_trained`).
    Raises ChainError before training when the registry serves `name` (`check_retrainable`).
    """
    import ray

    check_retrainable(cfg, name)
    job = job or build_job(cfg, name)
    stale = Path(job.storage_path) / job.run_name
    if fresh:
        if stale.is_dir():
            shutil.rmtree(stale)
        clear_caches(job.out_dir)  # --force: cached ensemble targets are recomputed too
    if not ray.is_initialized():
        # Workers' progress comes through a queue; Ray's own worker logs stay in its log files.
        init_ray(cfg)
    result = _run_interruptibly(job, log)
    register_trained(cfg, name, actor="train")  # lineage, sha256 of the bytes, metrics; bootstraps production
    return result
