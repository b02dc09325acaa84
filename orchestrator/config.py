"""Run configuration: schema of a whole run and its one-pass loader.

`load_config(path)` returns a typed `RunConfig` or raises `ConfigError` whose `problems`
are lines `file: key.path: message`, all problems of the file at once. Code below the
loader receives typed objects only.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from serving.index import IndexSpec
from serving.specs import ServingSpec
from workers.specs import DataSpec, GenerationSpec, ItemsSpec, ScalingSpec, StrictModel


class GatesSpec(StrictModel):
    """Offline gate of a candidate against production on held-out data (fractions, not %)."""

    max_error_increase: float = Field(0.0, ge=0, le=1, description="candidate error - production error")
    max_nfr: float = Field(0.02, ge=0, le=1)
    max_nfi: Optional[float] = Field(None, ge=0)
    max_class_nfr: float = Field(0.1, ge=0, le=1, description="worst per-class NFR")
    # Retrieval: candidate queries on the production gallery must beat production's own.
    require_bct: bool = True
    # Chance that the gate's verdict is wrong: it fails a candidate within every limit, or
    # passes one beyond a limit. Split over the checks (and over classes for max_class_nfr);
    # a check whose confidence bounds straddle its limit is inconclusive, never a pass or a
    # failure on noise (docs/evaluation.md).
    alpha: float = Field(0.05, gt=0, lt=0.5, description="error rate of the offline gate's verdict")
    # An inconclusive offline gate (the test set too small to decide) blocks `graceful
    # rollout` unless this is true: the live rollout's sequential tests then decide.
    allow_inconclusive: bool = False


class RolloutStep(StrictModel):
    """One canary step: candidate weight, time to bake, evidence needed before deciding."""

    weight: float = Field(..., gt=0, le=1)
    bake_seconds: float = Field(60.0, ge=0)
    min_requests: int = Field(100, ge=0)
    min_labels: int = Field(100, ge=0)


class RollbackBudget(StrictModel):
    """How `false_rollback_rate` is split over the rollout's tests (shares summing to 1):
    each test runs on rollout totals at its share, so the chance of any false rollback
    over the whole rollout is at most false_rollback_rate (a union bound)."""

    nfr: float = Field(0.6, gt=0, lt=1)
    errors: float = Field(0.2, gt=0, lt=1)
    latency: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> "RollbackBudget":
        total = self.nfr + self.errors + self.latency
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"shares must sum to 1, got {self.nfr:g} + {self.errors:g} + {self.latency:g} = {total:g}")
        return self


class GuardSpec(StrictModel):
    """The watch after promotion: the promoted generation keeps production as a shadow
    reference and is rolled back to it on a regression shown by the rollout's tests,
    until `labels` labelled samples (labelled disagreements with nfr_test disagreements)
    arrived or `seconds` passed, whichever comes first. Both 0: no guard."""

    labels: int = Field(0, ge=0)
    seconds: float = Field(0.0, ge=0)

    @property
    def enabled(self) -> bool:
        return self.labels > 0 or self.seconds > 0


def _default_steps() -> list[RolloutStep]:
    return [RolloutStep(weight=w) for w in (0.05, 0.25, 0.5)]


class RolloutSpec(StrictModel):
    """How the controller moves traffic: steps, the statistical rule and its limits."""

    steps: list[RolloutStep] = Field(default_factory=_default_steps, min_length=1)
    shadow_bake_seconds: float = Field(30.0, ge=0)
    nfr_limit: float = Field(0.01, gt=0, lt=1, description="largest acceptable live NFR")
    # Error bounds of the sequential rule: chance of rolling back a candidate at half the
    # limit, and of promoting one at twice the limit.
    false_rollback_rate: float = Field(0.05, gt=0, lt=0.5)
    false_promote_rate: float = Field(0.05, gt=0, lt=0.5)
    error_rate_limit: float = Field(0.01, ge=0, le=1, description="share of failed candidate requests")
    latency_p99_ms: float = Field(500.0, gt=0)
    # Which NFR test decides: "labelled" (every labelled sample, an SPRT on flips / labels)
    # or "disagreements" (labels needed only where candidate and production disagree:
    # the disagreement rate from every compared sample, the flip share from labelled
    # disagreements; docs/rollouts.md).
    nfr_test: Literal["labelled", "disagreements"] = "labelled"
    # Share of false_promote_rate spent on promoting from shadow disagreements before labels
    # ("labelled"), or of both error rates on the disagreement rate's bounds ("disagreements").
    disagreement_share: float = Field(0.2, gt=0, lt=1)
    min_errors: int = Field(5, ge=1, description="candidate errors in the rollout before the error-rate test may roll back")
    # The latency test counts calls slower than latency_p99_ms (the router's slow_calls):
    # the candidate's slow share against max(1 %, production's on the same traffic).
    min_latency_requests: int = Field(100, ge=1, description="timed candidate calls before the latency test may roll back")
    rollback_budget: RollbackBudget = Field(default_factory=RollbackBudget)
    guard: GuardSpec = Field(default_factory=GuardSpec)
    tick_seconds: float = Field(2.0, gt=0)
    # One controller per rollout: the holder renews its lease every tick; another controller
    # takes the rollout over only once the lease is this old (the holder died).
    lease_seconds: float = Field(15.0, gt=0, description="controller lease; at least 2 x tick_seconds")
    metric_source: Literal["router", "prometheus"] = "router"
    prometheus_url: str = "http://127.0.0.1:9090"
    max_source_errors: int = Field(10, ge=1, description="consecutive metric-source errors before pausing")
    prometheus_query_timeout_s: float = Field(5.0, gt=0, le=300, description="HTTP timeout of one PromQL query")
    # Window of the PromQL rate behind the candidate's latency p99 (histogram_quantile).
    prometheus_latency_window: str = Field("1m", pattern=r"^[1-9][0-9]*(ms|s|m|h)$")
    # The controller's own HTTP endpoint: /metrics (prometheus_client), GET /v1/rollout,
    # and the Alertmanager webhook POST /v1/admin/alert. 0 turns it off.
    metrics_port: int = Field(9108, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    @model_validator(mode="after")
    def _lease_outlives_ticks(self) -> "RolloutSpec":
        if self.lease_seconds < 2 * self.tick_seconds:
            raise ValueError(f"lease_seconds ({self.lease_seconds:g}) must be at least 2 x tick_seconds "
                             f"({self.tick_seconds:g}): the holder renews it once per tick")
        return self

    @field_validator("steps")
    @classmethod
    def _steps_increase(cls, steps: list[RolloutStep]) -> list[RolloutStep]:
        weights = [s.weight for s in steps]
        if any(b <= a for a, b in zip(weights, weights[1:])):
            raise ValueError(f"step weights must increase strictly, got {weights}")
        return steps


def _config_relative(v: Optional[Path], info: ValidationInfo) -> Optional[Path]:
    """A path relative to the config file's directory, made absolute; it must exist."""
    if v is None:
        return v
    base = (info.context or {}).get("base_dir")
    p = (v if v.is_absolute() or base is None else Path(base) / v).expanduser().resolve()
    if not p.exists():
        raise ValueError(f"not found: {p}")
    return p


# A path relative to the config file that must exist (each list item checked on its own).
ConfigPath = Annotated[Path, AfterValidator(_config_relative)]


class RuntimeEnvSpec(StrictModel):
    """How user code (model and data factories) reaches Ray workers on a cluster: Ray's
    `runtime_env`, passed to `ray.init` as it is. Local paths are relative to the config
    file; the driver imports from them too (`import_paths`)."""

    working_dir: Optional[ConfigPath] = Field(None, description="a directory shipped to every worker as its cwd")
    py_modules: list[ConfigPath] = Field(default_factory=list, description="package directories shipped to every worker")
    pip: list[str] = Field(default_factory=list, description="packages every worker installs")
    env_vars: dict[str, str] = Field(default_factory=dict)

    def as_ray(self) -> Optional[dict[str, Any]]:
        """The `runtime_env` mapping for `ray.init`; None when nothing is set."""
        env: dict[str, Any] = {}
        if self.working_dir is not None:
            env["working_dir"] = str(self.working_dir)
        if self.py_modules:
            env["py_modules"] = [str(p) for p in self.py_modules]
        if self.pip:
            env["pip"] = list(self.pip)
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        return env or None

    def import_paths(self) -> list[Path]:
        """Where the driver imports the same code from: the working_dir, and the directory
        holding each py_modules package."""
        paths = [self.working_dir] if self.working_dir is not None else []
        return paths + [p.parent for p in self.py_modules]


class RaySpec(StrictModel):
    """Ray settings every graceful process uses when it starts or joins a cluster."""

    runtime_env: RuntimeEnvSpec = Field(default_factory=RuntimeEnvSpec)


class TransformSpec(StrictModel):
    """The old-to-new transformation of stored vectors (`graceful catalogue transform`):
    h = linear least-squares map + residual MLP, fitted on pairs of the training pool's
    embeddings by both models, its state chosen by held-out retrieval top-1
    (`workers.transform.fit_transform`)."""

    hidden: int = Field(256, ge=1, le=65536, description="units of each MLP layer")
    depth: int = Field(2, ge=0, le=8, description="MLP layers before its output layer")
    steps: int = Field(2000, ge=0, description="optimiser steps; 0: the linear map alone")
    max_pairs: int = Field(20000, ge=20, description="training-pool rows embedded by both models")
    holdout: float = Field(0.1, ge=0, lt=0.5, description="share of the pairs that chooses the state")


class RetrievalSpec(StrictModel):
    """The retrieval catalogue (docs/serving.md, Catalogue): items embedded once by the
    gallery generation into a persisted faiss index the router loads; items added later
    are embedded by production into the same index."""

    catalogue: ItemsSpec = Field(default_factory=ItemsSpec)
    index: IndexSpec = Field(default_factory=IndexSpec)
    # A directory or file:// URI every router replica can read; relative to run_dir.
    # Default: run_dir/catalogue.
    path: Optional[str] = None
    embed_workers: int = Field(2, ge=1, le=256, description="Ray Data actors (1 CPU each) embedding items")
    embed_batch_size: int = Field(1024, ge=1, le=1_000_000, description="items per Ray Data batch")
    # Generations served only to requests that name them (`generation` in /v1/embed and
    # /v1/search): an edge query model beside the gallery model. Never shadowed or rolled out.
    query_generations: list[str] = Field(default_factory=list)
    transform: TransformSpec = Field(default_factory=TransformSpec)
    # Which items `graceful catalogue backfill --share` re-embeds first: random, or
    # uncertainty (the smallest margin of their model's head on the stored vector first;
    # measured worse at a 10 % share, docs/training.md).
    backfill_order: Literal["uncertainty", "random"] = "random"


def _nested(prefix: str, e: ValidationError) -> str:
    """A nested model's errors as one message under `prefix` (key.path: message; ...)."""
    return f"{prefix}: " + "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())


class SnapshotTrigger(StrictModel):
    """New data as files: each file matching `pattern` becomes a generation of
    `pipeline.template`, trained on that file (docs/pipeline.md, Triggers)."""

    # A glob, relative to the config file (`**` allowed); made absolute at load.
    pattern: str = Field(..., min_length=1)
    # The generation's name; `{stem}` is the file name without its suffix (characters a
    # name cannot hold become '-'). Stable: the same file always gives the same name.
    name: str = Field("{stem}", min_length=1)
    # How a snapshot becomes training data (`generations[].train_data`); every string
    # "{snapshot}" in it is replaced by the file's absolute path. Default: an .npz with
    # arrays x and y ({source: npz, path: "{snapshot}"}); a custom factory takes any format.
    data: Optional[dict[str, Any]] = None
    # A file is taken once it has not changed for this long (a copy still being written is not).
    settle_seconds: float = Field(2.0, ge=0)

    @field_validator("pattern")
    @classmethod
    def _absolute_pattern(cls, v: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base_dir")
        p = Path(v).expanduser()
        return str(p if p.is_absolute() or base is None else Path(base) / p)


class PipelineSpec(StrictModel):
    """`graceful run CONFIG`, the continuous pipeline (docs/pipeline.md)."""

    # Generations besides the listed ones: every field of a generation but `name` (and
    # `train_data`, which a snapshot sets); used by the triggers below.
    template: Optional[dict[str, Any]] = None
    snapshots: Optional[SnapshotTrigger] = None
    # A new generation of the template every this many seconds, on the run's data, named
    # "<schedule_prefix><UTC time of its slot>"; the first slot is the one `graceful run`
    # first saw (recorded in the registry).
    schedule_seconds: Optional[float] = Field(None, ge=60)
    schedule_prefix: str = Field("sched-", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")

    poll_seconds: float = Field(5.0, gt=0, description="wait between reconciliations when nothing is to do")
    # One call of the controller runs at most this long; the loop then looks again and
    # resumes the same rollout (a restarted process resumes it too).
    rollout_max_seconds: float = Field(3600.0, gt=0)
    webhook_url: Optional[str] = Field(None, pattern=r"^https?://", description="POSTed each stage transition")
    webhook_token_env: str = "GRACEFUL_WEBHOOK_TOKEN"
    webhook_timeout_s: float = Field(5.0, gt=0)
    # Consecutive loop errors (a stage raising for a reason outside the generation, e.g.
    # the router unreachable) before the loop says why and stops.
    max_consecutive_errors: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _template_for_triggers(self) -> "PipelineSpec":
        if (self.snapshots is not None or self.schedule_seconds is not None) and self.template is None:
            raise ValueError("snapshots and schedule_seconds make generations from `template`: set pipeline.template")
        if self.template is not None:
            for key in ("name", "train_data"):
                if key in self.template:
                    raise ValueError(f"template.{key}: set by the trigger, not the template")
            try:
                GenerationSpec.model_validate({**self.template, "name": "template"})
            except ValidationError as e:
                raise ValueError(_nested("template", e)) from None
        if self.snapshots is not None and self.snapshots.data is not None:
            try:
                DataSpec.model_validate({**self.snapshots.data, **({"path": "/dev/null"} if "path" in
                                                                      self.snapshots.data else {})})
            except ValidationError as e:
                raise ValueError(_nested("snapshots.data", e)) from None
        return self


class RegistrySpec(StrictModel):
    """Where the registry lives. No `url`: the embedded SQLite file run_dir/registry.sqlite
    (one machine, or one pod). `url` (postgresql://user@host:port/db): a PostgreSQL
    database that several pods share; the password comes from `password_env` (or libpq's
    PGPASSWORD / .pgpass), never from the config file."""

    url: Optional[str] = Field(None, pattern=r"^postgres(ql)?://[^\s]+$")
    password_env: str = Field("GRACEFUL_REGISTRY_PASSWORD", min_length=1)

    @field_validator("url")
    @classmethod
    def _no_password_in_url(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            from orchestrator.registry.backends import url_secrets

            found = url_secrets(v)
            if found:
                raise ValueError(f"registry.url carries a secret ({', '.join(found)}), which would sit in the "
                                 f"config file and in logs; put the password in the environment variable "
                                 f"named by registry.password_env")
        return v


class RunConfig(StrictModel):
    """A whole run: data, the chain of generations, scaling, gates, serving and rollout."""

    run_dir: Path = Path("runs/default")
    data: DataSpec = Field(default_factory=DataSpec)
    generations: list[GenerationSpec] = Field(..., min_length=1)
    # Whose embeddings fill the served gallery; default: the first generation.
    gallery_generation: Optional[str] = None
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    gates: GatesSpec = Field(default_factory=GatesSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    retrieval: RetrievalSpec = Field(default_factory=RetrievalSpec)
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec)
    registry: RegistrySpec = Field(default_factory=RegistrySpec)
    ray: RaySpec = Field(default_factory=RaySpec)

    @field_validator("run_dir")
    @classmethod
    def _absolute_run_dir(cls, v: Path) -> Path:
        # Relative to the working directory of the command, made absolute once here: Ray
        # workers, tasks and Serve replicas that get paths under it run elsewhere.
        return Path(v).expanduser().resolve()

    @model_validator(mode="after")
    def _log_under_run_dir(self) -> "RunConfig":
        # The sqlite prediction log lives with the run unless the config puts it elsewhere
        # (a relative path is taken relative to run_dir); absolute, like run_dir.
        p = self.serving.prediction_log_path
        path = self.run_dir / "predictions.sqlite" if p is None else (self.run_dir / Path(p).expanduser())
        if str(path) != p:
            self.serving.prediction_log_path = str(path.resolve())
        if self.serving.slow_call_ms is None:
            self.serving.slow_call_ms = self.rollout.latency_p99_ms
        return self

    def generation(self, name: str) -> GenerationSpec:
        """The generation called `name` (KeyError naming the known ones otherwise)."""
        for g in self.generations:
            if g.name == name:
                return g
        raise KeyError(f"unknown generation {name!r}; known: {[g.name for g in self.generations]}")

    @property
    def gallery(self) -> str:
        return self.gallery_generation or self.generations[0].name

    @property
    def catalogue_dir(self) -> Path:
        """Where the retrieval catalogue lives (`retrieval.path`, relative to run_dir)."""
        p = self.retrieval.path
        if p is None:
            return self.run_dir / "catalogue"
        p = p[len("file://"):] if p.startswith("file://") else p
        return (self.run_dir / Path(p).expanduser()).resolve()

    def config_hash(self) -> str:
        """Stable sha256 of the validated config (for lineage records)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


class ConfigError(Exception):
    """A config file that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "missing": "required key is missing",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "model_type": "must be a mapping of keys",
    "model_attributes_type": "must be a mapping of keys",
    "dict_type": "must be a mapping of keys",
    "too_short": "must have at least {min_length} item(s)",
    "string_too_short": "must have at least {min_length} character(s)",
    "string_too_long": "must have at most {max_length} characters",
    "string_pattern_mismatch": "must match {pattern}",
    "path_type": "must be a path",
}


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Known keys of the model that owns the last element of `loc` (for 'did you mean')."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside Optional[...] / list[...] annotations, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _num(v: Any) -> Any:
    """0.0 -> 0, 1e-05 stays: numbers in messages read as the user wrote them."""
    return f"{v:g}" if isinstance(v, float) else v


def _message(err: dict, root: type[BaseModel]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        close = difflib.get_close_matches(key, _fields_at(root, err["loc"]), n=1, cutoff=0.6)
        return "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}, got {err.get('input')!r}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind in _MESSAGES:
        try:
            return _MESSAGES[kind].format(**{k: _num(v) for k, v in ctx.items()}) + (
                f", got {err['input']!r}" if kind.endswith(("_type", "_parsing")) else ""
            )
        except (KeyError, IndexError):
            pass
    return err["msg"]


def _semantic_problems(raw: dict) -> list[tuple[str, str]]:
    """Cross-field checks the field types cannot express, as (key path, message).

    Runs on the raw mapping, defensively, so that its problems are reported in the same
    pass as the type errors.
    """
    problems = []
    gens = raw.get("generations")
    gens = gens if isinstance(gens, list) else []
    seen: dict[str, int] = {}
    for i, g in enumerate(gens):
        if not isinstance(g, dict):
            continue
        name = g.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append((f"generations[{i}].name",
                                 f"duplicate name {name!r} (also generations[{seen[name]}])"))
            seen.setdefault(name, i)
        if i == 0:
            if g.get("recipe") == "lqf":
                problems.append((f"generations[{i}].recipe",
                                 "lqf fine-tunes a parent; the first generation has none"))
            compat = g.get("compat") if isinstance(g.get("compat"), dict) else {}
            for term in ("bct", "focal_distillation"):
                if compat.get(term) is not None:
                    problems.append((f"generations[{i}].compat.{term}",
                                     "the first generation has no production model to be compatible with"))
    gallery = raw.get("gallery_generation")
    if gallery is not None and seen and gallery not in seen:
        problems.append(("gallery_generation", f"unknown generation {gallery!r}; known: {list(seen)}"))
    retrieval = raw.get("retrieval") if isinstance(raw.get("retrieval"), dict) else {}
    queries = retrieval.get("query_generations")
    for i, q in enumerate(queries if isinstance(queries, list) else []):
        if isinstance(q, str) and seen and q not in seen:
            problems.append((f"retrieval.query_generations[{i}]", f"unknown generation {q!r}; known: {list(seen)}"))
    path = retrieval.get("path")
    if isinstance(path, str) and "://" in path and not path.startswith("file://"):
        problems.append(("retrieval.path", f"{path!r}: a directory or a file:// URI (mount other storage on every "
                                           f"node)"))
    return problems


def load_config(path: str | Path) -> RunConfig:
    """Read, parse and validate a run config; raise ConfigError listing every problem."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ConfigError([f"{path}: file not found"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        pos = f"line {where.line + 1}, column {where.column + 1}: " if where else ""
        raise ConfigError([f"{name}: {pos}not valid YAML ({getattr(e, 'problem', None) or e})"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{name}: cannot read file ({e})"]) from None
    if raw is None:
        raise ConfigError([f"{name}: file is empty"])
    if not isinstance(raw, dict):
        raise ConfigError([f"{name}: top level must be a mapping of keys, got {type(raw).__name__}"])
    return parse_config(raw, name=name, base_dir=path.resolve().parent)


def parse_config(raw: dict, name: str = "<config>", base_dir: Optional[Path] = None) -> RunConfig:
    """Validate an already-parsed mapping (paths resolved against `base_dir`)."""
    lines = []
    cfg = None
    try:
        cfg = RunConfig.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as e:
        lines = [f"{name}: {_format_loc(err['loc'])}: {_message(err, RunConfig)}" for err in e.errors()]
    lines += [f"{name}: {loc}: {msg}" for loc, msg in _semantic_problems(raw)]
    if cfg is not None:
        lines += [f"{name}: {loc}: {msg}" for loc, msg in _stream_problems(cfg) + _factory_problems(cfg)]
    if lines or cfg is None:
        raise ConfigError(lines)
    return cfg


def _stream_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """Settings a generation that trains on a stream (`data.source: ray`) cannot have,
    found at load rather than when its training starts."""
    from workers.streaming import stream_problems, streams

    out = []
    for i, g in enumerate(cfg.generations):
        if streams(cfg.data, g):
            out += [(f"generations[{i}].compat.ensemble", p.split(": ", 1)[1]) for p in stream_problems(g)]
    return out


def _factories(cfg: RunConfig) -> list[tuple[str, str]]:
    """(key path, import path) of every factory the config names."""
    out = []
    if cfg.data.factory is not None:
        out.append(("data.factory", cfg.data.factory))
    for i, g in enumerate(cfg.generations):
        if g.arch.factory is not None:
            out.append((f"generations[{i}].arch.factory", g.arch.factory))
        if g.train_data is not None and g.train_data.factory is not None:
            out.append((f"generations[{i}].train_data.factory", g.train_data.factory))
    return out


def _factory_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """Factories that do not import, found once at load rather than in every Ray worker.

    The runtime_env's directories go on the driver's `sys.path` first: user code comes
    only from there, installed packages and PYTHONPATH, the import paths the operator set."""
    from workers.factory import FactoryError, add_import_paths, load_callable

    add_import_paths(cfg.ray.runtime_env.import_paths())
    problems = []
    for loc, path in _factories(cfg):
        try:
            load_callable(path, "factory")
        except FactoryError as e:
            problems.append((loc, str(e)))
    return problems


def init_ray(cfg: RunConfig, address: Optional[str] = None, **kwargs: Any) -> None:
    """`ray.init` with the config's runtime_env (the one place graceful starts or joins a
    Ray cluster for a run), quiet by default."""
    import ray

    opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    opts.update(kwargs)
    env = cfg.ray.runtime_env.as_ray()
    if env is not None:
        opts["runtime_env"] = env
    ray.init(address=address, **opts)
