"""The offline gate: a candidate generation against production on held-out data.

`evaluate(cfg, candidate, against=None)` loads both checkpoints (sha256 verified against
the registry, `weights_only=True`), predicts the test split, and computes with
`orchestrator.evaluation.metrics`: the error of both and its change, NFR, NFI, PFR, the worst
per-class NFR, the flip matrix, and for embeddings M(candidate, production) -- candidate
queries against the production model's gallery -- vs M(production, production). The pure
`decide(metrics, gates)` turns these into a three-way verdict with reasons: each check's
exact confidence bounds (orchestrator.evaluation.bounds) against its limit, `gates.alpha`
split over the checks, so the chance of a wrong pass or fail is at most alpha; bounds
that straddle a limit make the verdict 'inconclusive'. Every evaluation is recorded in
the registry with its verdict (in the record's metrics); a failed gate marks a 'trained'
candidate 'rejected', an inconclusive one leaves its status as it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import numpy as np

import orchestrator.evaluation.bounds as B
import orchestrator.evaluation.metrics as M
from orchestrator.config import GatesSpec, RunConfig
from orchestrator.registry import GenerationStatus, Registry, RegistryError, open_registry
from orchestrator.registry import ensure_registered as registered

EPS = B.EPS

class EvaluationError(RegistryError):
    """The evaluation cannot be run as asked (unknown or untrained generation, no baseline)."""


@dataclass(frozen=True)
class Check:
    """One gate key checked against its limit, three ways: 'pass' when the bound on the
    limit's side shows the value within it, 'fail' when the other bound shows it beyond,
    'inconclusive' when the bounds straddle the limit (the test set is too small to tell)."""

    key: str  # the GatesSpec key
    value: Optional[float]  # the point estimate
    limit: Optional[float]
    ok: bool  # verdict == "pass"
    reason: str  # the verdict with the bounds that decided it
    verdict: str = "pass"  # "pass" | "fail" | "inconclusive"
    lower: Optional[float] = None  # one-sided confidence bounds of the value, each at level `alpha`
    upper: Optional[float] = None
    alpha: Optional[float] = None  # this check's share of gates.alpha

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Evaluation:
    """One offline evaluation of `candidate` against `baseline`."""

    candidate: str
    baseline: str
    passed: bool  # verdict == "pass"
    reasons: list[str]  # why each check that did not pass failed or could not decide
    metrics: dict[str, Any]  # numbers; see `evaluation_metrics`
    checks: list[Check]
    per_class_nfr: list[float]
    flip_matrix: list[list[int]]  # [old predicted class][new predicted class] counts of negative flips
    evaluation_id: Optional[int] = None
    status: Optional[str] = None  # the candidate's registry status after the evaluation
    extra: dict[str, Any] = field(default_factory=dict)
    verdict: str = ""  # "pass" | "fail" | "inconclusive"; "" -> from `passed`

    def __post_init__(self) -> None:
        if not self.verdict:
            object.__setattr__(self, "verdict", "pass" if self.passed else "fail")
        if self.passed != (self.verdict == "pass"):
            raise ValueError(f"passed={self.passed} disagrees with verdict {self.verdict!r}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["checks"] = [c.as_dict() for c in self.checks]
        return d


# --- pure parts ---------------------------------------------------------------------------

def evaluation_metrics(y: np.ndarray, old_pred: np.ndarray, new_pred: np.ndarray, num_classes: int,
                       m_cand_prod: Optional[float], m_prod_prod: Optional[float],
                       n_boot: int = 1000,
                       hits: Optional[tuple[np.ndarray, np.ndarray]] = None) -> dict[str, Any]:
    """The numbers the gate reads, from labels and both models' predictions.

    Point estimates: n, error_baseline, error_candidate, error_change, nfr, nfi, pfr,
    disagreement, nfr_ci_low, nfr_ci_high (bootstrap 95%), worst_class, worst_class_nfr,
    m_candidate_production, m_production_production (None when the embeddings are not
    comparable). Counts the gate's bounds come from: negative_flips (b: production right,
    candidate wrong), positive_flips (c: production wrong, candidate right),
    errors_baseline, errors_candidate, class_samples and class_negative_flips (per true
    class), and with `hits` = (per-query top-1 hits of candidate queries in the production
    gallery, of production queries in it): bct_queries, bct_lost (production hit,
    candidate missed), bct_gained (the reverse).
    """
    r = M.compare(y, old_pred, new_pred, num_classes, n_boot=n_boot)
    yy, old, new = (np.asarray(a).reshape(-1) for a in (y, old_pred, new_pred))
    samples, class_flips = M.class_counts(yy, old, new, num_classes)
    out = {
        "n": r.n, "error_baseline": r.error_old, "error_candidate": r.error_new, "error_change": r.error_change,
        "nfr": r.nfr, "nfi": r.nfi, "pfr": r.pfr, "disagreement": r.disagreement,
        "nfr_ci_low": r.nfr_ci_low, "nfr_ci_high": r.nfr_ci_high,
        "worst_class": r.worst_class, "worst_class_nfr": r.worst_class_nfr,
        "m_candidate_production": m_cand_prod, "m_production_production": m_prod_prod,
        "negative_flips": int(M.negative_flips(yy, old, new).sum()),
        "positive_flips": int(M.positive_flips(yy, old, new).sum()),
        "errors_baseline": int((old != yy).sum()), "errors_candidate": int((new != yy).sum()),
        "class_samples": samples.tolist(), "class_negative_flips": class_flips.tolist(),
    }
    if hits is not None:
        cp, pp = (np.asarray(h, dtype=bool).reshape(-1) for h in hits)
        out.update(bct_queries=int(len(pp)), bct_lost=int((pp & ~cp).sum()), bct_gained=int((~pp & cp).sum()))
    return out


def gate_checks(metrics: dict[str, Any], gates: GatesSpec) -> list[Check]:
    """Every gate key against its limit, each decided by exact one-sided confidence bounds
    (orchestrator.evaluation.bounds); `gates.alpha` is split evenly over the checks that
    run (Bonferroni), so the chance that any check passes or fails wrongly is <= alpha.

    - max_error_increase: candidate error - production error, bounded by the exact
      McNemar test on the b (production right, candidate wrong) and c (the reverse)
      discordant pairs (bounds conditional on b + c);
    - max_nfr: NFR = b / n, Clopper-Pearson;
    - max_nfi (when set): NFI = NFR / candidate error = b / e, the share of the candidate's
      e errors that production got right: conditional on e, b ~ Binomial(e, NFI),
      Clopper-Pearson;
    - max_class_nfr: each class's flips / samples, Clopper-Pearson, Bonferroni over the
      classes with samples; bounds of the worst class are the largest lower and upper;
    - require_bct: M(candidate, production) - M(production, production), hit rates over
      the same queries, by the exact McNemar test on per-query hits; it passes when the
      lower bound is > 0 and fails when the upper bound is < 0.

    Example (alpha 0.05, four checks: 0.0125 a side each): n = 171 with b = 1, c = 0
    (candidate one extra error): the error change +0.0058 has bounds (-0.0058, +0.0058)
    around max_error_increase 0: inconclusive, not a failure.
    """
    run = 3 + (gates.max_nfi is not None) + bool(gates.require_bct)
    a = gates.alpha / run
    n = int(metrics["n"])
    out: list[Check] = []

    def add(key: str, value: Optional[float], lim: float, lo: float, hi: float, what: str,
            signed: bool = False, above: bool = False) -> None:
        f = (lambda x: f"{x:+.4f}") if signed else (lambda x: f"{x:.4f}")
        v = B.three_way(lo, hi, lim, above)
        name = "0" if above else f"{key} {lim:.4f}"
        if v == "pass":
            why = f"lower bound {f(lo)} > 0" if above else f"upper bound {f(hi)} <= {name}"
        elif v == "fail":
            why = f"upper bound {f(hi)} < 0" if above else f"lower bound {f(lo)} > {name}"
        else:
            why = f"the bounds straddle {name}: the test set is too small to decide"
        shown = "" if value is None else f" {f(value)}"
        out.append(Check(key, value, lim, v == "pass",
                         f"{what}{shown}, bounds [{f(lo)}, {f(hi)}] (alpha {a:.4g} a side): {v.upper()}, {why}",
                         v, lo, hi, a))

    b, c = int(metrics["negative_flips"]), int(metrics["positive_flips"])
    e0, e1 = metrics["error_baseline"], metrics["error_candidate"]
    lo, hi = B.paired_change(b, c, n, a, gates.max_error_increase)
    add("max_error_increase", metrics["error_change"], gates.max_error_increase, lo, hi,
        f"error change ({e0:.4f} -> {e1:.4f}; b={b}, c={c} of {n})", signed=True)
    lo, hi = B.clopper_pearson(b, n, a)
    add("max_nfr", metrics["nfr"], gates.max_nfr, lo, hi, f"NFR ({b}/{n})")
    if gates.max_nfi is not None:
        e = int(metrics["errors_candidate"])
        lo, hi = B.clopper_pearson(b, e, a)
        add("max_nfi", metrics["nfi"], gates.max_nfi, lo, hi, f"NFI ({b} of the candidate's {e} errors)")
    lows, highs = B.class_bounds(metrics["class_negative_flips"], metrics["class_samples"], a)
    worst = int(metrics["worst_class"])
    add("max_class_nfr", metrics["worst_class_nfr"], gates.max_class_nfr, max(lows), max(highs),
        f"worst per-class NFR (class {worst}: {metrics['class_negative_flips'][worst]}/"
        f"{metrics['class_samples'][worst]}; bounds over {sum(1 for s in metrics['class_samples'] if s)} classes)")
    if gates.require_bct:
        m_cp, m_pp = metrics.get("m_candidate_production"), metrics.get("m_production_production")
        if m_cp is None or m_pp is None:
            out.append(Check("require_bct", None, m_pp, False,
                             "embeddings not comparable with production's (different sizes): "
                             "the candidate cannot search the production gallery", "fail", None, None, a))
        elif "bct_queries" not in metrics:
            out.append(Check("require_bct", m_cp - m_pp, 0.0, False,
                             "no per-query retrieval hits to bound M(candidate, production) - "
                             "M(production, production): inconclusive", "inconclusive", None, None, a))
        else:
            lost, gained, q = int(metrics["bct_lost"]), int(metrics["bct_gained"]), int(metrics["bct_queries"])
            lo, hi = B.paired_change(gained, lost, q, a)
            add("require_bct", m_cp - m_pp, 0.0, lo, hi,
                f"M(candidate, production) {m_cp:.4f} - M(production, production) {m_pp:.4f} "
                f"(gained {gained}, lost {lost} of {q} queries)", signed=True, above=True)
    return out


def decide(metrics: dict[str, Any], gates: GatesSpec) -> tuple[str, list[str], list[Check]]:
    """(verdict, reasons, checks): 'fail' if any check of `gate_checks` fails, else 'pass'
    if all pass, else 'inconclusive'; the reasons are those of the checks that did not
    pass. Pure: numbers in, verdict out."""
    checks = gate_checks(metrics, gates)
    return B.overall([c.verdict for c in checks]), [c.reason for c in checks if c.verdict != "pass"], checks


def gate(metrics: dict[str, Any], gates: GatesSpec) -> tuple[bool, list[str]]:
    """(passed, reasons it did not pass) of `decide`."""
    verdict, reasons, _ = decide(metrics, gates)
    return verdict == "pass", reasons


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
    m_cp = hits_cp = None  # stay None when the embedding sizes differ: not comparable
    hits_pp = M.retrieval_hits(emb_b[:half], y[:half], emb_b[half:], y[half:])
    if emb_b.shape[1] == emb_c.shape[1]:
        hits_cp = M.retrieval_hits(emb_c[:half], y[:half], emb_b[half:], y[half:])
        m_cp = float(np.mean(hits_cp))
    m_pp = float(np.mean(hits_pp))
    mets = evaluation_metrics(y, pred_b, pred_c, classes, m_cp, m_pp, n_boot=n_boot,
                              hits=None if hits_cp is None else (hits_cp, hits_pp))
    verdict, reasons, checks = decide(mets, gates)
    per_class = M.per_class_nfr(y, pred_b, pred_c, classes).tolist()
    flips = M.flip_matrix(y, pred_b, pred_c, classes).tolist()
    return Evaluation(names[1], names[0], verdict == "pass", reasons, mets, checks, per_class, flips,
                      verdict=verdict)


def query_generation_top1(cfg: RunConfig, reg: Registry, x: np.ndarray, y: np.ndarray) -> Optional[dict]:
    """M(q, gallery) for each trained `retrieval.query_generations` entry q: top-1 of q's
    embeddings of the first half of the test rows searched among the gallery generation's
    embeddings of the second half (as `compare_models` splits them), beside M(gallery,
    gallery). Reported, not gated. None when no query generation is configured; a
    generation not trained yet, or embedding into another size, is left out (None)."""
    from workers.training import predict

    if not cfg.retrieval.query_generations:
        return None
    half = len(y) // 2
    gal = predict(load_verified(reg, cfg.gallery, cfg), x)[0]
    out = {"gallery": cfg.gallery, "gallery_top1": float(np.mean(M.retrieval_hits(gal[:half], y[:half], gal[half:],
                                                                                   y[half:]))), "top1": {}}
    for q in cfg.retrieval.query_generations:
        try:
            ensure_registered(cfg, reg, q)
            if reg.generation(q) is None:
                raise EvaluationError(f"{q} is not registered")
        except EvaluationError:
            out["top1"][q] = None  # not trained yet
            continue
        emb = predict(load_verified(reg, q, cfg), x[:half])[0]
        out["top1"][q] = (float(np.mean(M.retrieval_hits(emb, y[:half], gal[half:], y[half:])))
                          if emb.shape[1] == gal.shape[1] else None)
    return out


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
    candidate to 'trained'; an inconclusive one changes no status. Raises EvaluationError for requests that cannot be run and
    IntegrityError when a checkpoint does not match its record."""
    from workers.data import load_dataset

    reg = registry or open_registry(cfg)
    try:
        ensure_registered(cfg, reg, candidate)
        baseline = resolve_baseline(reg, candidate, against)
        ensure_registered(cfg, reg, baseline)
        ds = load_dataset(cfg.data)
        ev = compare_models(load_verified(reg, baseline, cfg), load_verified(reg, candidate, cfg),
                            ds.test.x, ds.test.y, cfg.gates, (baseline, candidate), n_boot)
        mets, verdict, reasons = ev.metrics, ev.verdict, ev.reasons
        heterogeneous = query_generation_top1(cfg, reg, ds.test.x, ds.test.y)
        if heterogeneous is not None:
            mets = {**mets, "query_generations": heterogeneous}
            ev = replace(ev, metrics=mets)
        per_class, flips = ev.per_class_nfr, ev.flip_matrix
        eid, status = None, reg.generation(candidate).status
        if record:
            # The registry row keeps `passed` and `reasons`; the three-way verdict and each
            # check's bounds travel in its metrics (what `graceful rollout` reads).
            eid = reg.record_evaluation(candidate, baseline,
                                        {**mets, "verdict": verdict, "checks": [c.as_dict() for c in ev.checks],
                                         "per_class_nfr": per_class, "flip_matrix": flips,
                                         "gates": cfg.gates.model_dump(),
                                         # the bytes judged: a retrained generation needs a new gate
                                         "candidate_sha256": reg.generation(candidate).sha256,
                                         "baseline_sha256": reg.generation(baseline).sha256},
                                        verdict == "pass", reasons)
            if verdict == "fail" and status == GenerationStatus.TRAINED:
                status = reg.set_status(candidate, GenerationStatus.REJECTED, "evaluate",
                                        f"offline gate failed (evaluation {eid}): " + "; ".join(reasons)).status
            elif verdict == "pass" and status == GenerationStatus.REJECTED:
                status = reg.set_status(candidate, GenerationStatus.TRAINED, "evaluate",
                                        f"offline gate passed (evaluation {eid})").status
            # inconclusive: the status stays as it is
        return replace(ev, evaluation_id=eid, status=status)
    finally:
        if registry is None:
            reg.close()


def render(ev: Evaluation) -> str:
    """The verdict a person reads: one line per check (its bounds and limit), then the
    point estimates."""
    m = ev.metrics
    head = (f"{ev.candidate} vs {ev.baseline}: {ev.verdict.upper()}"
            + (f" (evaluation {ev.evaluation_id}, status {ev.status})" if ev.evaluation_id is not None else ""))
    lines = [head]
    for c in ev.checks:
        lines.append(f"  [{TAGS.get(c.verdict, c.verdict)}] {c.reason}")
    lines.append(f"  error {m['error_baseline']:.4f} -> {m['error_candidate']:.4f} ({m['error_change']:+.4f}); "
                 f"NFR {m['nfr']:.4f}, NFI {m['nfi']:.4f}, PFR {m['pfr']:.4f}; {m['n']} held-out samples")
    het = m.get("query_generations")
    if het:
        got = ", ".join(f"M({q}, {het['gallery']}) " + ("n/a" if v is None else f"{100 * v:.1f} %")
                        for q, v in het["top1"].items())
        lines.append(f"  query generations (reported, not gated): {got}; M({het['gallery']}, {het['gallery']}) "
                     f"{100 * het['gallery_top1']:.1f} %")
    if ev.verdict == "inconclusive":
        lines.append(f"  inconclusive: {INCONCLUSIVE_HINT}")
    return "\n".join(lines)


TAGS = {"pass": "ok", "fail": "FAIL", "inconclusive": "??"}
INCONCLUSIVE_HINT = ("the test set is too small to decide at gates.alpha; evaluate on more data, or set "
                     "gates.allow_inconclusive to let the live rollout decide")
