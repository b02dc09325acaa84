"""The one registration path: a trained generation's run-dir files -> a registry record.

Whoever registers a generation (`graceful train`, `evaluate`, `rollout`, `serve`, the demo,
the RayService builders) comes through `register_trained`, which hashes the checkpoint's
bytes itself and refuses a file that does not match what training recorded. The lineage
comes from what training recorded too (`metrics.json` "parent": the production model the
generation was trained against), never from the order of the YAML.
"""

from __future__ import annotations

from typing import Any, Optional

from orchestrator.registry.records import GenerationRecord
from orchestrator.registry.store import IntegrityError, Registry, RegistryError, open_registry
from orchestrator.rundir import generation_dir, model_file, read_metrics
from workers.checkpoint import sha256_file


class NotTrainedError(RegistryError):
    """A generation asked for has no trained checkpoint in the run dir."""


def register_trained(cfg: Any, name: str, actor: str = "train", registry: Optional[Registry] = None,
                     _seen: Optional[set] = None) -> GenerationRecord:
    """Register generation `name` from its run-dir files (model.pt, metrics.json).

    The checkpoint's sha256 is computed from its bytes and must equal the one training
    recorded (IntegrityError otherwise). The parent is the one training recorded; a
    parent trained but not registered yet (a run dir older than the registry) is
    registered first. A retrained checkpoint replaces the record, except for a served
    generation (RegistryError, see `Registry.check_replaceable`). When no generation was
    ever production, a generation without parent becomes production ("bootstrap: first
    generation"). RegistryError when `name` is unknown to the config or not trained."""
    reg = registry or open_registry(cfg)
    try:
        names = [g.name for g in cfg.generations]
        if name not in names:
            raise RegistryError(f"unknown generation {name!r}; known: {names}")
        m = read_metrics(cfg, name)
        if m is None:
            raise NotTrainedError(f"generation {name!r} is not trained (no model.pt and metrics.json under "
                                f"{generation_dir(cfg, name)}); run `graceful train CONFIG --generation {name}`")
        path = model_file(cfg, name)
        actual = sha256_file(path)
        if actual != m.get("sha256"):
            raise IntegrityError(f"checkpoint of {name!r} does not match its metrics.json: {path} has sha256 "
                                 f"{actual}, metrics.json records {m.get('sha256')}; refusing to register it")
        seen = (_seen or set()) | {name}
        parent = m.get("parent")
        if parent is not None and reg.generation(parent) is None:
            if parent in names and parent not in seen and read_metrics(cfg, parent) is not None:
                register_trained(cfg, parent, actor, reg, seen)
            else:
                parent = None  # trained against a model this registry never knew
        kept = {k: v for k, v in m.items() if k != "history"}  # the per-step history stays in metrics.json
        record = reg.add_generation(name, parent, cfg.generation(name).arch.type, str(m.get("config_hash", "")),
                                    str(path), actual, kept, actor=actor, replace=True)
        if parent is None and reg.bootstrap_production(name, actor):
            record = reg.generation(name)
        assert record is not None
        return record
    finally:
        if registry is None:
            reg.close()


def ensure_registered(cfg: Any, reg: Registry, name: str, actor: str) -> GenerationRecord:
    """The registry's record of `name`, registering it from the run dir when it was
    trained but never registered. A registered generation is never re-read from the run
    dir: its recorded sha256 is what every later load is checked against."""
    rec = reg.generation(name)
    if rec is not None:
        return rec
    if name != cfg.generations[0].name:
        # The chain's first generation bootstraps production, whichever generation is asked
        # for first (the RayService builders of g0 and g1 run at the same time).
        production_of(cfg, reg)
    return register_trained(cfg, name, actor=actor, registry=reg)


def production_of(cfg: Any, reg: Registry) -> Optional[GenerationRecord]:
    """The registry's production generation. A run dir older than its registry (trained,
    never registered, no generation ever production) registers its first generation,
    which bootstraps production. None when nothing is in production."""
    prod = reg.production()
    first = cfg.generations[0].name
    if prod is None and reg.generation(first) is None and not reg.ever_in_production() \
            and read_metrics(cfg, first) is not None:
        register_trained(cfg, first, actor="bootstrap", registry=reg)
        prod = reg.production()
    return prod
