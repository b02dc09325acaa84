"""The Python API: train, evaluate, serve and roll out from Python, without writing YAML.

A `Run` is a run directory whose config is built from Python arguments. It is the same
run the CLI drives: the config is validated by the loader (`orchestrator.config`) and
written to `run_dir/graceful.yaml` after every change, the registry under `run_dir` is
the single source of truth, and each method calls the library function the matching CLI
command calls, so the same safety checks apply and the errors the CLI reports come back
as exceptions (ConfigError, DataError, FactoryError, ChainError, EvaluationError,
RolloutRefused, CheckpointError, RegistryError; a failure inside the Ray Train workers
comes back as Ray Train's error). Relative paths in the arguments are relative to the
working directory.

    run = Run("runs/nb", data="mypkg.data:load")
    g0 = run.train("g0", "mypkg.models:build", kwargs={"width": 64})
    g1 = run.train("g1", "mypkg.models:build", compat={"bct": {}, "focal_distillation": {}})
    run.evaluate("g1").verdict              # 'pass', 'fail' or 'inconclusive' (.passed: a pass)
    with run.serve(candidates=["g1"]) as served:
        run.rollout("g1", served).state        # 'promoted' or 'rolled_back'

`train_compatible` and `evaluate` are the one-call forms.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import yaml

from orchestrator.config import ConfigError, RunConfig, init_ray, load_config, parse_config
from workers.data import DataError, Split, check_arrays
from workers.factory import FactoryError
from workers.specs import DataSpec

CONFIG_FILE = "graceful.yaml"
BUILTIN_MODELS = ("mlp", "cnn1d", "cnn2d")

# A model: a built-in name, a factory's import path "module:callable", or the callable
# itself when it is importable by that path (defined in a module, not in a notebook cell).
ModelLike = Union[str, Callable[..., Any]]
# Data: a DataSpec (or its mapping), a data factory (import path or importable callable),
# arrays (x, y), or {"train": (x, y), "val": (x, y), "test": (x, y)} of arrays.
DataLike = Union[DataSpec, Mapping[str, Any], str, Callable[..., Any], tuple]


def factory_path(fn: ModelLike, what: str = "factory") -> str:
    """The import path of a factory: the string itself, or "module:qualname" of a callable
    that Ray workers (other processes) can import by that name. FactoryError otherwise."""
    if isinstance(fn, str):
        return fn
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not callable(fn) or not mod or not qual:
        raise FactoryError(f"{what} {fn!r}: give a callable or its import path 'module:callable'")
    if mod == "__main__" or "<locals>" in qual or "<lambda>" in qual:
        raise FactoryError(f"{what} {mod}:{qual}: Ray workers import factories by name, so it must be defined "
                           f"at the top level of an importable module (not in __main__, a notebook cell or "
                           f"another function)")
    return f"{mod}:{qual}"


def _save_arrays(data: Any, run_dir: Path) -> Path:
    """Arrays from Python, checked, written once under run_dir/data/ by content hash (the
    workers read them from there: a run directory every node sees)."""
    if isinstance(data, Mapping):
        if "train" not in data or "test" not in data or set(data) - {"train", "val", "test"}:
            raise DataError(f"data: a dict of splits needs 'train' and 'test' (and optionally 'val'), got {sorted(data)}")
        splits = {k: check_arrays(*v, where=f"data[{k!r}]") for k, v in data.items()}
        arrays = {f"{a}_{k}": getattr(s, a) for k, s in splits.items() for a in ("x", "y")}
    else:
        s = check_arrays(data[0], data[1], where="data")
        arrays = {"x": s.x, "y": s.y}
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    path = run_dir / "data" / f"{h.hexdigest()[:16]}.npz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    return path


def data_spec(data: DataLike, run_dir: Path) -> dict[str, Any]:
    """The `data:` section for `data` (see `DataLike`), as a plain mapping."""
    if isinstance(data, DataSpec):
        return data.model_dump(mode="json", exclude_defaults=True)
    if isinstance(data, Mapping) and "source" in data:
        out = dict(data)
        if out.get("path") is not None:  # relative to the caller's working directory
            out["path"] = str(Path(out["path"]).expanduser().resolve())
        return out
    if isinstance(data, str) or callable(data):
        return {"source": "custom", "factory": factory_path(data, "data factory")}
    if isinstance(data, Mapping) or (isinstance(data, (tuple, list)) and len(data) == 2):
        return {"source": "npz", "path": str(_save_arrays(data, run_dir))}
    raise DataError(f"data: expected a DataSpec, a factory, (x, y) or a dict of splits, got {type(data).__name__}")


@dataclass(frozen=True)
class Generation:
    """A trained generation of a run: its checkpoint (verified by sha256), metrics and status."""

    name: str
    checkpoint: str
    sha256: str
    status: str
    metrics: dict[str, Any] = field(repr=False)
    run_dir: str = ""
    factory: Optional[str] = None  # what the run's config expects its checkpoint to record

    def load(self):
        """The model, verified by sha256 and by the factory the run's config names for it
        (`workers.checkpoint.load_model`)."""
        from workers.checkpoint import load_model

        return load_model(self.checkpoint, self.sha256, factory=self.factory)[0]


class Served:
    """A router (and its generations) on Ray Serve, started by `Run.serve`; a context
    manager that shuts Serve down on exit. `url` is the router's base URL; `client` a
    `serving.client.RouterClient` for it."""

    def __init__(self, url: str, admin_token: Optional[str]):
        from serving.client import RouterClient

        self.url = url
        self.client = RouterClient(url, admin_token)

    def stop(self) -> None:
        from serving.deploy import stop_serving

        self.client.close()
        stop_serving()

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Run:
    """A run directory driven from Python (see the module docstring).

    `data`: see `DataLike`. `scaling`, `gates`, `serving`, `rollout`, `ray`: the config
    sections of the same names, as mappings (docs/configuration.md). An existing
    `run_dir/graceful.yaml` is opened and continued (its generations kept); the arguments
    given then replace its sections.
    """

    def __init__(self, run_dir: str | Path, data: Optional[DataLike] = None, **sections: Mapping[str, Any]):
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.path = self.run_dir / CONFIG_FILE
        raw: dict[str, Any] = {}
        if self.path.is_file():
            raw = yaml.safe_load(self.path.read_text()) or {}
        elif data is None:
            raise ConfigError([f"{self.path}: no run here yet; give `data` to start one"])
        raw["run_dir"] = str(self.run_dir)
        if data is not None:
            spec = data_spec(data, self.run_dir)
            if raw.get("generations") and raw.get("data") not in (None, spec):
                raise ConfigError([f"{self.path}: data: this run's data is {raw['data']}, not {spec}; every "
                                   f"generation is evaluated on the run's data, so new data for one generation "
                                   f"goes to Run.train(..., train_data=...)"])
            raw["data"] = spec
        unknown = sorted(set(sections) - set(RunConfig.model_fields))
        if unknown:
            raise ConfigError([f"Run: unknown section(s) {unknown}; known: {sorted(RunConfig.model_fields)}"])
        raw.update({k: dict(v) for k, v in sections.items()})
        env = (raw.get("ray") or {}).get("runtime_env") if isinstance(raw.get("ray"), dict) else None
        if isinstance(env, dict):  # local paths: relative to the caller's working directory
            if isinstance(env.get("working_dir"), str):
                env["working_dir"] = str(Path(env["working_dir"]).expanduser().resolve())
            if isinstance(env.get("py_modules"), list):
                env["py_modules"] = [str(Path(p).expanduser().resolve()) if isinstance(p, str) else p
                                     for p in env["py_modules"]]
        raw.setdefault("generations", [])
        self._raw = raw
        if raw["generations"]:
            self._save(self._validate(raw))

    # --- config -------------------------------------------------------------------------------

    def _validate(self, raw: dict[str, Any]) -> RunConfig:
        return parse_config(copy.deepcopy(raw), name=str(self.path), base_dir=self.run_dir)

    def _save(self, cfg: RunConfig) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text(yaml.safe_dump(self._raw, sort_keys=False))
        os.replace(tmp, self.path)

    @property
    def config(self) -> RunConfig:
        """The run's validated config (as `graceful` commands read it from `self.path`)."""
        if not self._raw["generations"]:
            raise ConfigError([f"{self.path}: no generation yet; train one first (Run.train)"])
        return load_config(self.path)

    def registry(self):
        """The run's registry (`orchestrator.registry.Registry`; close it, or use `with`)."""
        from orchestrator.registry import open_registry

        return open_registry(self.config)

    def generation(self, name: str) -> Generation:
        """Generation `name` as the registry records it (RegistryError if it is not there)."""
        from orchestrator.chain import expected_factory_of
        from orchestrator.registry import RegistryError
        from orchestrator.rundir import read_metrics

        cfg = self.config
        with self.registry() as reg:
            rec = reg.generation(name)
            if rec is None:
                raise RegistryError(f"generation {name!r} is not registered in {self.run_dir}")
            return Generation(name, rec.checkpoint_uri, rec.sha256, str(rec.status),
                              read_metrics(cfg, name) or {}, str(self.run_dir), expected_factory_of(cfg, name))

    # --- the lifecycle --------------------------------------------------------------------------

    def train(self, name: str, model: ModelLike, *, kwargs: Optional[Mapping[str, Any]] = None,
              arch: Optional[Mapping[str, Any]] = None, compat: Optional[Mapping[str, Any]] = None,
              train: Optional[Mapping[str, Any]] = None, recipe: str = "standard",
              train_data: Optional[DataLike] = None, force: bool = False,
              log: Callable[[str], None] = print, **generation: Any) -> Generation:
        """Add (or replace) generation `name` and train it on Ray Train, against what the
        registry says (its parent is production; BCT ancestors are the ever-production
        generations and the gallery's), as `graceful train` does. A generation trained
        already with this config is not retrained unless `force`.

        `model`: "mlp", "cnn1d", "cnn2d" or a factory (`ModelLike`) called as
        `factory(input_shape, num_classes, **kwargs)`. `arch`: other `arch` keys
        (embed_dim, head, width, ...); `compat`, `train`: those sections; `train_data`: this
        generation's own data (`DataLike`); other keyword arguments are generation keys
        (train_fraction, label_noise, lqf, offline_gate)."""
        from orchestrator.chain import ChainError, embed_dim_problems, train_generation, trained_with_this_config

        spec: dict[str, Any] = {"name": name, "arch": dict(arch or {}), "recipe": recipe, **generation}
        if isinstance(model, str) and model in BUILTIN_MODELS:
            spec["arch"]["type"] = model
        else:
            spec["arch"].update(type="custom", factory=factory_path(model, "model factory"))
        if kwargs:
            spec["arch"]["kwargs"] = dict(kwargs)
        if compat is not None:
            spec["compat"] = dict(compat)
        if train is not None:
            spec["train"] = dict(train)
        if train_data is not None:
            spec["train_data"] = data_spec(train_data, self.run_dir)
        raw = copy.deepcopy(self._raw)
        gens = [g for g in raw["generations"] if g.get("name") != name]
        at = next((i for i, g in enumerate(raw["generations"]) if g.get("name") == name), len(gens))
        gens.insert(at, spec)
        raw["generations"] = gens
        cfg = self._validate(raw)
        self._raw = raw
        self._save(cfg)
        cfg = self.config
        with self.registry() as reg:
            problems = embed_dim_problems(cfg, reg, name)
            done = trained_with_this_config(cfg, name, reg)
        if problems:
            raise ChainError("; ".join(problems))
        if done is None or force:
            train_generation(cfg, name, log=log, fresh=force)
        return self.generation(name)

    def evaluate(self, candidate: str, against: Optional[str] = None):
        """The offline gate of `candidate` against production (or `against`), recorded in
        the registry as `graceful evaluate` does: an `orchestrator.evaluation.Evaluation`
        (`verdict` 'pass', 'fail' or 'inconclusive'; each check's bounds in `checks`)."""
        from orchestrator.evaluation.evaluate import evaluate

        return evaluate(self.config, candidate, against)

    def serve(self, candidates: Sequence[str] = (), admin_token: Optional[str] = None) -> Served:
        """Start the router and its generations on Ray Serve (Ray started here, or joined at
        RAY_ADDRESS, when not initialised), production and traffic from the registry, as
        `graceful serve` does. `admin_token`: the admin bearer token (default: the config's)."""
        import ray

        from orchestrator.apps import build_catalogue, serving_plan, start_router

        cfg = self.config
        if not ray.is_initialized():
            init_ray(cfg, address=os.environ.get("RAY_ADDRESS"))
        token = admin_token or cfg.serving.resolved_admin_token()
        with self.registry() as reg:
            plan = serving_plan(cfg, reg, list(candidates))
            url = start_router(cfg, reg, plan, catalogue=build_catalogue(cfg, reg), admin_token=token)
        return Served(url, token)

    def rollout(self, candidate: str, served: Served, *, skip_gate: bool = False, reason: Optional[str] = None,
                max_seconds: Optional[float] = None, on_tick: Optional[Callable[[Any], None]] = None,
                actor: str = "python"):
        """Roll `candidate` out on the router `served` and drive it to the end (promoted,
        rolled back, or `max_seconds`), as `graceful rollout` does: the gate is enforced,
        one controller holds the rollout's lease, operator commands from the CLI apply at
        the next tick. Returns the rollout's `orchestrator.registry.RolloutRecord`."""
        from orchestrator.apps import attach_on_cluster
        from orchestrator.registry import FINAL_STATES
        from orchestrator.rollout.controller import Controller
        from orchestrator.rollout.sources import source_for
        from orchestrator.rollout.start import start_rollout

        cfg = self.config
        source = source_for(cfg, served.client)
        with self.registry() as reg:
            attach = attach_on_cluster(cfg, reg)
            r = start_rollout(cfg, reg, served.client, source, candidate, actor,
                              reason or f"Run.rollout({candidate!r})", skip_gate=skip_gate, attach=attach)
            ctl = Controller(cfg, reg, served.client, source, rollout_id=r.id, attach=attach)
            try:
                ctl.hold_lease(r, time.time())
                ctl.run(threading.Event(), on_tick=on_tick, max_seconds=max_seconds)
            finally:
                ctl.release_lease()
            final = reg.rollout(r.id)
            if ctl.stopped is not None and final.state not in FINAL_STATES:
                from orchestrator.rollout.controller import ControllerStopped

                raise ControllerStopped(ctl.stopped)
            return final


# --- one-call forms ---------------------------------------------------------------------------

def train_compatible(model: ModelLike, data: DataLike, *, name: str, run_dir: str | Path,
                     against: Sequence[Generation] = (), compat: Optional[Mapping[str, Any]] = None,
                     scaling: Optional[Mapping[str, Any]] = None, **options: Any) -> Generation:
    """Train generation `name` of the run in `run_dir` (started with `data` if new) from
    `model`, with the compatibility terms `compat` (e.g. {"bct": {}, "focal_distillation":
    {}}) on Ray Train with `scaling`. Other options are those of `Run.train`.

    `against`: the older generations you expect it to be constrained against. The registry
    decides (the parent is production); each one must be production now or have been, else
    ChainError says what the registry holds instead."""
    from orchestrator.chain import ChainError

    run = Run(run_dir, data, **({"scaling": scaling} if scaling is not None else {}))
    if against:
        with run.registry() as reg:
            ever = set(reg.ever_production())
            prod = reg.production()
        wrong = [g.name for g in against if g.name not in ever]
        if wrong:
            raise ChainError(f"train_compatible: {wrong} never were production in {run.run_dir}; a generation is "
                             f"constrained against production ({prod.name if prod else 'none'}) and earlier "
                             f"productions only")
    return run.train(name, model, compat=compat, **options)


def evaluate(old: Any, new: Any, test_data: Any, gates: Optional[Mapping[str, Any]] = None,
             factories: Sequence[str] = ()):
    """The offline gate of `new` against `old` on `test_data`, recorded nowhere: an
    `orchestrator.evaluation.Evaluation` with the gate's three-way `verdict` and its checks
    (error change, NFR, NFI, worst per-class NFR, BCT retrieval), each with exact
    confidence bounds. `old`, `new`: `Generation`s, models, or checkpoint
    paths; `test_data`: (x, y) or a `workers.data.Split`; `gates`: the `gates:` keys.

    A checkpoint path is loaded only if it is of a built-in architecture or was built by
    one of `factories` (import paths you trust): loading a custom checkpoint imports and
    calls its factory, so a file from elsewhere never chooses the code that runs."""
    from orchestrator.config import GatesSpec
    from orchestrator.evaluation.evaluate import compare_models
    from workers.checkpoint import BUILTIN, CheckpointError, factory_of, load_model, read_checkpoint

    def model_of(m: Any):
        if isinstance(m, Generation):
            return m.load()
        if isinstance(m, (str, Path)):
            recorded = factory_of(read_checkpoint(m)[1])
            if recorded != BUILTIN and recorded not in factories:
                raise CheckpointError(f"checkpoint {m} was built by factory {recorded}; pass "
                                      f"factories=[{recorded!r}] if you trust it")
            return load_model(m, factory=recorded)[0]
        return m

    split = test_data if isinstance(test_data, Split) else check_arrays(test_data[0], test_data[1], "test_data")
    names = tuple(getattr(m, "name", role) for m, role in ((old, "old"), (new, "new")))
    return compare_models(model_of(old), model_of(new), split.x, split.y, GatesSpec(**dict(gates or {})),
                          names, n_boot=1000)  # type: ignore[arg-type]
