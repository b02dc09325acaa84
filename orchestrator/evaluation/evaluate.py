"""The offline gate: a candidate generation against production on held-out data.

`evaluate(cfg, candidate, against=None)` loads both checkpoints (sha256 verified against
the registry, `weights_only=True`), predicts the test split, and computes with
`orchestrator.evaluation.metrics`: the error of both and its change, NFR, NFI, PFR, the worst
per-class NFR, the flip matrix, and for embeddings M(candidate, production) -- candidate
queries against the production model's gallery -- vs M(production, production). The pure
`gate(metrics, gates)` turns these into a verdict with reasons. Every evaluation is
recorded in the registry; a failed gate marks a 'trained' candidate 'rejected'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import numpy as np

import orchestrator.evaluation.metrics as M
from orchestrator.config import GatesSpec, RunConfig
from orchestrator.registry import GenerationStatus, Registry, RegistryError, registry_path
from orchestrator.registry import ensure_registered as registered

# Float tolerance of the thresholds: NFR 2/100 against max_nfr 0.02 is a pass, not a
# rounding accident.
EPS = 1e-12


class EvaluationError(RegistryError):
    """The evaluation cannot be run as asked (unknown or untrained generation, no baseline)."""


@dataclass(frozen=True)
class Check:
    """One gate key checked against its limit."""

    key: str  # the GatesSpec key
    value: Optional[float]
    limit: Optional[float]
    ok: bool
    reason: str  # why it failed, or what it checked when it passed

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Evaluation:
    """One offline evaluation of `candidate` against `baseline`."""

    candidate: str
    baseline: str
    passed: bool
    reasons: list[str]
    metrics: dict[str, Any]  # numbers; see `evaluation_metrics`
    checks: list[Check]
    per_class_nfr: list[float]
    flip_matrix: list[list[int]]  # [old predicted class][new predicted class] counts of negative flips
    evaluation_id: Optional[int] = None
    status: Optional[str] = None  # the candidate's registry status after the evaluation
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["checks"] = [c.as_dict() for c in self.checks]
        return d


# --- pure parts ---------------------------------------------------------------------------

def evaluation_metrics(y: np.ndarray, old_pred: np.ndarray, new_pred: np.ndarray, num_classes: int,
                       m_cand_prod: Optional[float], m_prod_prod: Optional[float],
                       n_boot: int = 1000) -> dict[str, Any]:
    """The numbers the gate reads, from labels and both models' predictions.

    Keys: n, error_baseline, error_candidate, error_change, nfr, nfi, pfr, disagreement,
    nfr_ci_low, nfr_ci_high, worst_class, worst_class_nfr, m_candidate_production,
    m_production_production (None when the embeddings are not comparable).
    """
    r = M.compare(y, old_pred, new_pred, num_classes, n_boot=n_boot)
    return {
        "n": r.n, "error_baseline": r.error_old, "error_candidate": r.error_new, "error_change": r.error_change,
        "nfr": r.nfr, "nfi": r.nfi, "pfr": r.pfr, "disagreement": r.disagreement,
        "nfr_ci_low": r.nfr_ci_low, "nfr_ci_high": r.nfr_ci_high,
        "worst_class": r.worst_class, "worst_class_nfr": r.worst_class_nfr,
        "m_candidate_production": m_cand_prod, "m_production_production": m_prod_prod,
    }


def gate_checks(metrics: dict[str, Any], gates: GatesSpec) -> list[Check]:
    """Every gate key against its limit (a limit is exceeded when value > limit).

    Example: error 0.10 -> 0.12 is error_change 0.02 > max_error_increase 0 -> fails;
    NFR 0.02 <= max_nfr 0.02 -> passes; with require_bct, M(candidate, production) 0.80
    must be > M(production, production) 0.85 -> fails.
    """
    out = []

    def limit(key: str, value: float, lim: Optional[float], what: str) -> None:
        if lim is None:
            return
        ok = value <= lim + EPS
        out.append(Check(key, value, lim, ok,
                         f"{what} {value:.4f} {'<=' if ok else '>'} {key} {lim:.4f}"))

    e0, e1 = metrics["error_baseline"], metrics["error_candidate"]
    limit("max_error_increase", metrics["error_change"], gates.max_error_increase,
          f"error change ({e0:.4f} -> {e1:.4f})")
    limit("max_nfr", metrics["nfr"], gates.max_nfr, "NFR")
    limit("max_nfi", metrics["nfi"], gates.max_nfi, "NFI")
    limit("max_class_nfr", metrics["worst_class_nfr"], gates.max_class_nfr,
          f"worst per-class NFR (class {metrics['worst_class']})")
    if gates.require_bct:
        m_cp, m_pp = metrics.get("m_candidate_production"), metrics.get("m_production_production")
        if m_cp is None or m_pp is None:
            out.append(Check("require_bct", None, m_pp, False,
                             "embeddings not comparable with production's (different sizes): "
                             "the candidate cannot search the production gallery"))
        else:
            ok = M.bct_criterion(m_cp, m_pp)
            out.append(Check("require_bct", m_cp, m_pp, ok,
                             f"M(candidate, production) {m_cp:.4f} {'>' if ok else '<='} "
                             f"M(production, production) {m_pp:.4f}"))
    return out


def gate(metrics: dict[str, Any], gates: GatesSpec) -> tuple[bool, list[str]]:
    """(passed, reasons it failed): the candidate passes when every check of
    `gate_checks` does. Pure: numbers in, verdict out."""
    failed = [c.reason for c in gate_checks(metrics, gates) if not c.ok]
    return not failed, failed


# --- side effects at the edges ------------------------------------------------------------

def load_verified(reg: Registry, name: str, cfg: Optional[RunConfig] = None):
    """The model of generation `name`, after its file's sha256 matched the registry (and,
    with `cfg`, its factory is the one the config names for it)."""
    from orchestrator.chain import expected_factory_of
    from workers.checkpoint import load_model  # every kind, weights_only

    path = reg.verify_checkpoint(name)
    factory = expected_factory_of(cfg, name) if cfg is not None else None
    model, _ = load_model(path, reg.generation(name).sha256, factory=factory)
    return model


def outputs(reg: Registry, names: list[str], x: np.ndarray,
            cfg: Optional[RunConfig] = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(embeddings, logits) on `x` of each named generation (verified checkpoints)."""
    from workers.training import predict

    return {n: predict(load_verified(reg, n, cfg), x) for n in names}


def compare_models(baseline, candidate, x: np.ndarray, y: np.ndarray, gates: GatesSpec,
                   names: tuple[str, str] = ("baseline", "candidate"), n_boot: int = 1000) -> Evaluation:
    """The offline gate of model `candidate` against model `baseline` on test rows `x`
    (N, *input_shape) with labels `y`: every metric and check of `evaluate`, recorded
    nowhere. Retrieval uses the first half of the rows as queries and the second as the
    gallery. The models may differ in architecture and in classes (a candidate that knows
    new classes); their input shapes must be those of `x`."""
    from workers.training import predict

    (emb_b, log_b), (emb_c, log_c) = predict(baseline, x), predict(candidate, x)
    pred_b, pred_c = log_b.argmax(1), log_c.argmax(1)
    classes = max(int(y.max()) + 1, log_b.shape[1], log_c.shape[1])
    half = len(y) // 2  # query half / gallery half, as workers.data.Dataset splits them
    m_cp = None  # stays None when the embedding sizes differ: not comparable
    if emb_b.shape[1] == emb_c.shape[1]:
        m_cp = M.retrieval_top1(emb_c[:half], y[:half], emb_b[half:], y[half:])
    m_pp = M.retrieval_top1(emb_b[:half], y[:half], emb_b[half:], y[half:])
    mets = evaluation_metrics(y, pred_b, pred_c, classes, m_cp, m_pp, n_boot=n_boot)
    checks = gate_checks(mets, gates)
    passed, reasons = gate(mets, gates)
    per_class = M.per_class_nfr(y, pred_b, pred_c, classes).tolist()
    flips = M.flip_matrix(y, pred_b, pred_c, classes).tolist()
    return Evaluation(names[1], names[0], passed, reasons, mets, checks, per_class, flips)


def ensure_registered(cfg: RunConfig, reg: Registry, name: str) -> None:
    """`orchestrator.registry.ensure_registered` (the one registration path), with its
    refusals as EvaluationError naming what is wrong."""
    try:
        cfg.generation(name)
        registered(cfg, reg, name, actor="evaluate")
    except KeyError as e:
        if reg.generation(name) is None:
            raise EvaluationError(str(e.args[0])) from None
    except RegistryError as e:
        raise EvaluationError(str(e)) from None


def resolve_baseline(reg: Registry, candidate: str, against: Optional[str]) -> str:
    if against is None:
        prod = reg.production()
        if prod is None:
            raise EvaluationError("no generation is in production; name the baseline with --against")
        against = prod.name
    if against == candidate:
        raise EvaluationError(f"{candidate!r} is the baseline itself; name another with --against")
    return against


def evaluate(cfg: RunConfig, candidate: str, against: Optional[str] = None,
             registry: Optional[Registry] = None, record: bool = True, n_boot: int = 1000) -> Evaluation:
    """Evaluate `candidate` against `against` (default: production) on the test split,
    gate it with `cfg.gates`, and record the evaluation in the registry. A failed gate sets
    a 'trained' candidate's status to 'rejected'; a passing one returns a 'rejected'
    candidate to 'trained'. Raises EvaluationError for requests that cannot be run and
    IntegrityError when a checkpoint does not match its record."""
    from workers.data import load_dataset

    reg = registry or Registry(registry_path(cfg))
    try:
        ensure_registered(cfg, reg, candidate)
        baseline = resolve_baseline(reg, candidate, against)
        ensure_registered(cfg, reg, baseline)
        ds = load_dataset(cfg.data)
        ev = compare_models(load_verified(reg, baseline, cfg), load_verified(reg, candidate, cfg),
                            ds.test.x, ds.test.y, cfg.gates, (baseline, candidate), n_boot)
        mets, passed, reasons = ev.metrics, ev.passed, ev.reasons
        per_class, flips = ev.per_class_nfr, ev.flip_matrix
        eid, status = None, reg.generation(candidate).status
        if record:
            eid = reg.record_evaluation(candidate, baseline,
                                        {**mets, "per_class_nfr": per_class, "flip_matrix": flips,
                                         "gates": cfg.gates.model_dump(),
                                         # the bytes judged: a retrained generation needs a new gate
                                         "candidate_sha256": reg.generation(candidate).sha256,
                                         "baseline_sha256": reg.generation(baseline).sha256}, passed, reasons)
            if not passed and status == GenerationStatus.TRAINED:
                status = reg.set_status(candidate, GenerationStatus.REJECTED, "evaluate",
                                        f"offline gate failed (evaluation {eid}): " + "; ".join(reasons)).status
            elif passed and status == GenerationStatus.REJECTED:
                status = reg.set_status(candidate, GenerationStatus.TRAINED, "evaluate",
                                        f"offline gate passed (evaluation {eid})").status
        return replace(ev, evaluation_id=eid, status=status)
    finally:
        if registry is None:
            reg.close()


def render(ev: Evaluation) -> str:
    """The verdict a person reads: one line per check, then the numbers."""
    m = ev.metrics
    head = (f"{ev.candidate} vs {ev.baseline}: {'PASS' if ev.passed else 'FAIL'}"
            + (f" (evaluation {ev.evaluation_id}, status {ev.status})" if ev.evaluation_id is not None else ""))
    lines = [head]
    for c in ev.checks:
        lines.append(f"  [{'ok' if c.ok else 'FAIL'}] {c.reason}")
    lines.append(f"  error {m['error_baseline']:.4f} -> {m['error_candidate']:.4f} ({m['error_change']:+.4f}); "
                 f"NFR {m['nfr']:.4f} (95% CI {m['nfr_ci_low']:.4f}-{m['nfr_ci_high']:.4f}), "
                 f"NFI {m['nfi']:.4f}, PFR {m['pfr']:.4f}; {m['n']} held-out samples")
    return "\n".join(lines)
