"""The rollout decision rule: a pure function from live counts to promote / hold / rollback.

`decide(obs, step, policy)` is called by the controller at every tick on counts that only
grow. It must stay valid under that continuous monitoring, so the NFR evidence is a
sequential probability ratio test (SPRT) whose boundaries come from Ville's inequality
rather than from a fixed sample size:

    LLR(k, n) = k * log(p1/p0) + (n - k) * log((1 - p1)/(1 - p0))

over n labelled samples with k negative flips, p0 = 0.5 * nfr_limit (a good candidate),
p1 = 2 * nfr_limit (a bad one). exp(LLR) is a non-negative martingale of mean 1 under
p0, so P(LLR ever >= log(1/alpha)) <= alpha (Ville), whatever ticks it is looked at; and
exp(-LLR) is one under p1, so P(LLR ever <= log(beta)) <= beta. For a true NFR below p0
(above p1) the martingale becomes a super-martingale, so the bounds hold a fortiori.

Rollback when LLR >= log(1/false_rollback_rate); promote the step (after bake time and
minimum counts) when LLR <= log(false_promote_rate * (1 - disagreement_share)). Before
labels arrive, the same test on disagreements / compared samples (the disagreement rate
bounds the NFR from above: a negative flip is a disagreement) may promote with the rest
of the false-promote budget; it never rolls back. See docs/rollouts.md, "The rollout decision rule".

No I/O, no clock: times arrive as numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from orchestrator.config import RolloutSpec, RolloutStep

PROMOTE = "promote"
HOLD = "hold"
ROLLBACK = "rollback"
INCONCLUSIVE = "inconclusive"
KINDS = (PROMOTE, HOLD, ROLLBACK, INCONCLUSIVE)


@dataclass(frozen=True)
class Counts:
    """Candidate vs production counts, a delta over some window."""

    requests: int = 0            # candidate requests (primary + shadow)
    errors: int = 0              # failed candidate calls (errors + shadow errors + shadow timeouts)
    compared: int = 0            # samples predicted by both production and candidate
    disagreements: int = 0       # compared samples whose predicted classes differ
    labelled: int = 0            # samples with a label joined to both predictions
    negative_flips: int = 0      # labelled samples production got right and candidate wrong
    latency_p99_ms: Optional[float] = None   # candidate's recent p99 (None = unknown)
    # Identity of the counter set a raw snapshot came from (the router's start time): a
    # different epoch means the counters restarted from zero. Not a count; None in deltas.
    epoch: Optional[float] = None


@dataclass(frozen=True)
class Observation:
    """What the controller saw at one tick."""

    total: Counts                # since the rollout started: evidence of the sequential NFR test
    step: Counts                 # since the current step started: min counts, error rate, latency
    step_elapsed_s: float        # seconds since the current step started (bake time)
    # Consecutive earlier ticks of this step whose p99 was above latency_p99_ms on fresh
    # requests (kept by the controller: decide is pure and has no memory of its own).
    latency_breaches: int = 0


@dataclass(frozen=True)
class Decision:
    """The rule's answer: kind in KINDS, one audit line, and the numbers behind it."""

    kind: str
    reason: str
    stats: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Pure statistics (scalar or numpy arrays alike; the benchmark calls these vectorised).

def design_rates(limit: float, low: float = 0.5, high: float = 2.0) -> tuple[float, float]:
    """(p0, p1) of the SPRT for a rate limit: low*limit and high*limit, p1 kept below 1.

    limit 0.01 -> (0.005, 0.02); limit 0.6 -> (0.3, 0.8) (2*0.6 capped at (1+0.6)/2).
    """
    return low * limit, min(high * limit, (1.0 + limit) / 2.0)


def sprt_llr(k, n, p0: float, p1: float):
    """Log-likelihood ratio of rate p1 against p0 after k events in n Bernoulli trials.

    k=1, n=100, p0=0.005, p1=0.02: 1*log(4) + 99*log(0.98/0.995)
    = 1.3863 + 99*(-0.015190) = 1.3863 - 1.5038 = -0.1175.
    """
    return k * math.log(p1 / p0) + (n - k) * math.log((1.0 - p1) / (1.0 - p0))


def sprt_bounds(false_high: float, false_low: float) -> tuple[float, float]:
    """(lower, upper) LLR boundaries valid at every look (Ville's inequality).

    Crossing `upper` = log(1/false_high) happens with chance <= false_high when the rate is
    p0; crossing `lower` = log(false_low) with chance <= false_low when it is p1.
    0.05, 0.05 -> (-2.9957, 2.9957).
    """
    return math.log(false_low), math.log(1.0 / false_high)


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def confidence_sequence(k: int, n: int, alpha: float, prior_mean: float,
                        prior_strength: float = 1.0) -> tuple[float, float]:
    """(lower, upper): a Beta-mixture confidence sequence for a Bernoulli rate.

    log M(p) = logB(a+k, b+n-k) - logB(a, b) - k log p - (n-k) log(1-p) is, for the true
    p, the log of a mean-1 martingale, so {p : log M(p) < log(1/alpha)} covers the true
    rate at every n simultaneously with chance >= 1 - alpha. The prior Beta(a, b) has mean
    `prior_mean` and a + b = prior_strength / prior_mean (a = prior_strength). It is only
    reported (stats nfr_lower / nfr_upper); the decision uses the SPRT, which is more
    efficient at its two design rates.
    """
    if n <= 0:
        return 0.0, 1.0
    a = prior_strength
    b = max(prior_strength / prior_mean - a, 1e-9)
    const = _log_beta(a + k, b + n - k) - _log_beta(a, b)
    bound = math.log(1.0 / alpha)

    def inside(p: float) -> bool:
        return const - k * math.log(p) - (n - k) * math.log1p(-p) < bound

    mle = min(max(k / n, 1e-12), 1 - 1e-12)
    lower = 0.0 if inside(1e-12) else _edge(inside, mle, 0.0)
    upper = 1.0 if inside(1 - 1e-12) else _edge(inside, mle, 1.0)
    return lower, upper


def _edge(inside, p_in: float, p_out: float, iterations: int = 60) -> float:
    """The last point inside the set `inside` on the way from p_in (inside) to p_out, by bisection."""
    for _ in range(iterations):
        mid = (p_in + p_out) / 2
        p_in, p_out = (mid, p_out) if inside(mid) else (p_in, mid)
    return p_in


# ---------------------------------------------------------------------------------------

def _invalid(c: Counts) -> Optional[str]:
    """Why counts cannot be used (a counter reset or a broken source), or None."""
    for name in ("requests", "errors", "compared", "disagreements", "labelled", "negative_flips"):
        if getattr(c, name) < 0:
            return f"negative {name} ({getattr(c, name)})"
    if c.errors > c.requests:
        return f"errors {c.errors} > requests {c.requests}"
    if c.disagreements > c.compared:
        return f"disagreements {c.disagreements} > compared {c.compared}"
    if c.negative_flips > c.labelled:
        return f"negative_flips {c.negative_flips} > labelled {c.labelled}"
    return None


def decide(obs: Optional[Observation], step: Optional[RolloutStep], policy: RolloutSpec, *,
           disagreement_share: Optional[float] = None, min_errors: Optional[int] = None,
           min_latency_requests: Optional[int] = None, latency_ticks: Optional[int] = None) -> Decision:
    """Promote / hold / rollback / inconclusive for the current step (pure).

    obs None (metric source down) or unusable counts -> "inconclusive", never a rollback.
    step None = the shadow phase: bake policy.shadow_bake_seconds, min counts of steps[0].

    Rollback (any time, no bake): the NFR SPRT on total counts reaches
    log(1/false_rollback_rate); or the step's error SPRT (error_rate_limit vs twice it)
    does with at least `min_errors` errors; or the step's p99 latency exceeds
    latency_p99_ms with at least `min_latency_requests` step requests on `latency_ticks`
    ticks in a row (obs.latency_breaches earlier ones + this one). A breach short of that
    holds (never promotes). stats["latency_breach"] is 1.0 when this tick breaches, so the
    controller can keep the count: latency_breaches 2, p99 600 > 500 ms -> 3rd tick -> rollback.
    Promote: bake time, min_requests done, and either min_labels labelled with the NFR
    SPRT at or below log(false_promote_rate * (1 - disagreement_share)), or min_labels
    compared samples with the disagreement SPRT at or below
    log(false_promote_rate * disagreement_share). Otherwise hold.
    The keyword knobs default to the policy's keys of the same names (`rollout.*`).
    """
    disagreement_share = policy.disagreement_share if disagreement_share is None else disagreement_share
    min_errors = policy.min_errors if min_errors is None else min_errors
    min_latency_requests = policy.min_latency_requests if min_latency_requests is None else min_latency_requests
    latency_ticks = policy.latency_ticks if latency_ticks is None else latency_ticks
    if obs is None:
        return Decision(INCONCLUSIVE, "metric source down: no observation", {})
    for where, c in (("total", obs.total), ("step", obs.step)):
        why = _invalid(c)
        if why:
            return Decision(INCONCLUSIVE, f"unusable {where} counts: {why}", {})

    gate = step if step is not None else policy.steps[0]
    bake = step.bake_seconds if step is not None else policy.shadow_bake_seconds
    t, s = obs.total, obs.step
    p0, p1 = design_rates(policy.nfr_limit)
    beta_nfr = policy.false_promote_rate * (1.0 - disagreement_share)
    beta_dis = policy.false_promote_rate * disagreement_share
    lower_nfr, upper = sprt_bounds(policy.false_rollback_rate, beta_nfr)
    llr_nfr = sprt_llr(t.negative_flips, t.labelled, p0, p1)
    llr_dis = sprt_llr(t.disagreements, t.compared, p0, p1)
    lower_dis = math.log(beta_dis) if beta_dis > 0 else -math.inf
    nfr_lo, nfr_hi = confidence_sequence(t.negative_flips, t.labelled,
                                         min(policy.false_rollback_rate, policy.false_promote_rate),
                                         prior_mean=policy.nfr_limit)
    error_rate = s.errors / s.requests if s.requests else 0.0
    llr_err = _error_llr(s.errors, s.requests, policy.error_rate_limit)
    stats: dict[str, float] = {
        "live_nfr": t.negative_flips / t.labelled if t.labelled else 0.0,
        "nfr_lower": nfr_lo, "nfr_upper": nfr_hi,
        "labelled": float(t.labelled), "negative_flips": float(t.negative_flips),
        "llr_nfr": llr_nfr, "llr_promote_at": lower_nfr, "llr_rollback_at": upper,
        "disagreement": t.disagreements / t.compared if t.compared else 0.0,
        "llr_disagreement": llr_dis, "llr_disagreement_promote_at": lower_dis,
        "error_rate": error_rate, "llr_error": llr_err,
        "step_requests": float(s.requests), "step_labelled": float(s.labelled),
        "step_elapsed_s": float(obs.step_elapsed_s),
    }
    # NaN (Prometheus' histogram_quantile over no data) or a negative value is unknown,
    # like None: it disables the latency check without making the whole tick inconclusive.
    latency = s.latency_p99_ms
    if latency is not None and not (0 <= latency < math.inf):
        latency = None
    if latency is not None:
        stats["latency_p99_ms"] = float(latency)
    latency_breach = latency is not None and s.requests >= min_latency_requests and latency > policy.latency_p99_ms
    stats["latency_breach"] = 1.0 if latency_breach else 0.0
    stats["latency_breaches"] = float(obs.latency_breaches + 1 if latency_breach else 0)
    # JSON has no infinity: an error LLR of inf (limit 0) is stored as +-1e9.
    stats = {k: max(-1e9, min(1e9, v)) for k, v in stats.items()}

    nfr_txt = f"NFR {t.negative_flips}/{t.labelled}"
    if llr_nfr >= upper:
        return Decision(ROLLBACK, f"{nfr_txt} shown above the limit {policy.nfr_limit:g}: "
                        f"LLR {llr_nfr:.2f} >= {upper:.2f} (SPRT {p0:g} vs {p1:g})", stats)
    if s.errors >= min_errors and llr_err >= math.log(1.0 / policy.false_rollback_rate):
        return Decision(ROLLBACK, f"error rate {s.errors}/{s.requests} = {error_rate:.4f} shown above "
                        f"the limit {policy.error_rate_limit:g}: LLR {llr_err:.2f}", stats)
    if latency_breach and obs.latency_breaches + 1 >= latency_ticks:
        return Decision(ROLLBACK, f"p99 latency {latency:.1f} ms > {policy.latency_p99_ms:g} ms "
                        f"on {obs.latency_breaches + 1} ticks in a row, {s.requests} step requests", stats)
    if latency_breach:
        return Decision(HOLD, f"p99 latency {latency:.1f} ms > {policy.latency_p99_ms:g} ms "
                        f"({obs.latency_breaches + 1}/{latency_ticks} ticks in a row before a rollback)", stats)

    waiting = []
    if obs.step_elapsed_s < bake:
        waiting.append(f"bake {obs.step_elapsed_s:.0f}/{bake:g} s")
    if s.requests < gate.min_requests:
        waiting.append(f"requests {s.requests}/{gate.min_requests}")
    nfr_ok = llr_nfr <= lower_nfr
    dis_ok = llr_dis <= lower_dis
    if waiting:
        return Decision(HOLD, "waiting: " + ", ".join(waiting) + f"; {nfr_txt}, LLR {llr_nfr:.2f}", stats)
    if nfr_ok and s.labelled >= gate.min_labels:
        return Decision(PROMOTE, f"{nfr_txt} shown under the limit {policy.nfr_limit:g}: "
                        f"LLR {llr_nfr:.2f} <= {lower_nfr:.2f} (SPRT {p0:g} vs {p1:g})", stats)
    if dis_ok and s.compared >= gate.min_labels:
        return Decision(PROMOTE, f"disagreement {t.disagreements}/{t.compared} (an upper bound of the NFR) "
                        f"shown under the limit: LLR {llr_dis:.2f} <= {lower_dis:.2f}", stats)
    if nfr_ok:
        return Decision(HOLD, f"waiting: labels {s.labelled}/{gate.min_labels}; {nfr_txt}, "
                        f"LLR {llr_nfr:.2f}", stats)
    return Decision(HOLD, f"not yet shown: {nfr_txt}, LLR {llr_nfr:.2f} in ({lower_nfr:.2f}, {upper:.2f}); "
                    f"disagreement {t.disagreements}/{t.compared}, LLR {llr_dis:.2f}", stats)


def _error_llr(errors: int, requests: int, limit: float) -> float:
    """LLR of an error rate of 2*limit against `limit` (inf when limit is 0 and errors > 0).

    errors=5, requests=100, limit=0.01: 5*log(2) + 95*log(0.98/0.99)
    = 3.4657 + 95*(-0.010152) = 3.4657 - 0.9645 = 2.5012.
    """
    if requests <= 0:
        return 0.0
    if limit <= 0:
        return math.inf if errors > 0 else 0.0
    e0, e1 = design_rates(limit, low=1.0, high=2.0)
    if e1 <= e0:
        return -math.inf  # limit 1: no error rate can exceed it
    return sprt_llr(errors, requests, e0, e1)
