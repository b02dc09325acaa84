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

Rollback when LLR >= log(1/(false_rollback_rate * rollback_budget.nfr)) (the NFR's
share of the rollout's one error budget; the error-rate and latency tests have the
rest, all on the rollout's totals); promote the step (after bake time and
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

import numpy as np

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
    # Labelled samples on which the two predictions differ (rollout.nfr_test: disagreements).
    # Last, so that counts built by position before it existed still mean what they did.
    labelled_disagreements: int = 0
    # The latency test's counts: candidate calls timed and those slower than
    # rollout.latency_p99_ms; the same two of the baseline (production) on the same traffic.
    timed: int = 0
    slow: int = 0
    base_timed: int = 0
    base_slow: int = 0


@dataclass(frozen=True)
class Observation:
    """What the controller saw at one tick."""

    total: Counts                # since the rollout started: evidence of the sequential NFR test
    step: Counts                 # since the current step started: min counts, error rate, latency
    step_elapsed_s: float        # seconds since the current step started (bake time)


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


def confidence_sequence(k, n, alpha: float, prior_mean: float, prior_strength: float = 1.0):
    """(lower, upper): a Beta-mixture confidence sequence for a Bernoulli rate.

    log M(p) = logB(a+k, b+n-k) - logB(a, b) - k log p - (n-k) log(1-p) is, for the true
    p, the log of a mean-1 martingale, so {p : log M(p) < log(1/alpha)} covers the true
    rate at every n simultaneously with chance >= 1 - alpha (both ends at once). The
    prior Beta(a, b) has mean `prior_mean` and a + b = prior_strength / prior_mean
    (a = prior_strength); it shapes the width, never the coverage. `k`, `n` may be
    numpy arrays (the benchmark's rollouts at once): the ends are found by 60 steps of
    bisection from the maximum-likelihood rate, where log M <= 0 (the mixture is a mean
    of likelihoods, at most the largest). n = 0 -> (0, 1).
    """
    from scipy.special import betaln

    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    a = prior_strength
    b = max(prior_strength / prior_mean - a, 1e-9)
    const = betaln(a + k, b + n - k) - betaln(a, b)
    bound = math.log(1.0 / alpha)

    def inside(p):
        return const - k * np.log(p) - (n - k) * np.log1p(-p) < bound

    eps = 1e-12
    mle = np.clip(k / np.maximum(n, 1.0), eps, 1 - eps)
    ends = []
    for out in (eps, 1 - eps):
        p_in, p_out = mle, np.full_like(mle, out)
        for _ in range(60):
            mid = (p_in + p_out) / 2
            ok = inside(mid)
            p_in, p_out = np.where(ok, mid, p_in), np.where(ok, p_out, mid)
        ends.append(np.where(inside(np.full_like(mle, out)), round(out), p_in))
    lower, upper = (np.where(n <= 0, v, e) for v, e in ((0.0, ends[0]), (1.0, ends[1])))
    if lower.ndim == 0:
        return float(lower), float(upper)
    return lower, upper


def conditional_llr(flips, labelled, disagreement, limit: float):
    """The NFR SPRT's log-likelihood ratio on labelled disagreements, given a
    disagreement rate: NFR = disagreement * q, q = P(negative flip | disagreement).

    NFR p0 vs p1 (design_rates(limit)) is q0 = p0/d vs q1 = p1/d (q1 capped as design_rates
    caps it), the SPRT of q1 against q0 over `labelled` disagreements with `flips`
    negative flips. The LLR does not increase with q0 (the q1/q0 term falls or stays, the
    (1-q1)/(1-q0) term falls), so it grows with d: a lower bound of d gives the smaller LLR
    (used to roll back: harder to reach) and an upper bound the larger (used to promote:
    harder to fall to), each conservative for its side. Where d <= p0 (q0 >= 1) no NFR
    above p0 is possible: -inf.

    flips 1, labelled 10, d 0.05, limit 0.01: q0 = 0.1, q1 = 0.4:
    1*log(4) + 9*log(0.6/0.9) = 1.3863 - 3.6492 = -2.2629.
    """
    p0, p1 = design_rates(limit)
    d = np.asarray(disagreement, dtype=np.float64)
    q0 = np.minimum(p0 / np.maximum(d, 1e-300), 1.0)
    q1 = np.minimum(p1 / np.maximum(d, 1e-300), (1.0 + q0) / 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        llr = flips * np.log(q1 / q0) + (labelled - flips) * np.log((1.0 - q1) / (1.0 - q0))
    llr = np.where(q0 >= 1.0, -np.inf, np.nan_to_num(llr, nan=0.0))
    return float(llr) if llr.ndim == 0 else llr


def disagreement_test(compared, disagreements, labelled, flips, limit: float, false_rollback: float,
                      false_promote: float, share: float) -> dict:
    """The NFR test that needs labels only where the models disagree (pure; arrays work).

    A negative flip is a disagreement, so NFR = d * q: d, the disagreement rate, from
    every compared sample without a label; q, the flip share, from labelled disagreements
    only. d gets a confidence sequence at `share` of the smaller error rate; q the SPRT of
    `conditional_llr` with the rest: roll back when the LLR at d's lower end reaches
    log(1/(false_rollback * (1 - share))), promote when the LLR at d's upper end falls to
    log(false_promote * (1 - share)), or, without labels, when d's upper end is below p1
    (then NFR <= d < p1). On the event that d's sequence covers it (chance >= 1 - share
    * rate) each LLR is on its conservative side of the true-d SPRT, whose Ville bound
    holds at every look: P(false rollback) <= false_rollback, P(promote at p1) <=
    false_promote. Returns the bounds, both LLRs and `rollback` / `promote` flags.

    compared 2000, disagreements 100, labelled 100 disagreements, 2 flips, limit 0.01:
    d's upper end (share 0.2 of 0.05) is 0.0713, so q0 = 0.0701, q1 = 0.2806 and the LLR
    at it is 2 log 4 + 98 log(0.7194/0.9299) = 2.77 - 25.15 = -22.4 <= log(0.04) = -3.2:
    promote.
    """
    p0, p1 = design_rates(limit)
    alpha_d = min(false_rollback, false_promote) * share
    d_lo, d_hi = confidence_sequence(disagreements, compared, alpha_d, prior_mean=p1)
    llr_rollback = conditional_llr(flips, labelled, d_lo, limit)
    llr_promote = conditional_llr(flips, labelled, d_hi, limit)
    upper = math.log(1.0 / (false_rollback * (1.0 - share)))
    lower = math.log(false_promote * (1.0 - share))
    rollback = llr_rollback >= upper
    promote = ~np.asarray(rollback) & ((np.asarray(llr_promote) <= lower) | (np.asarray(d_hi) < p1))
    if np.ndim(promote) == 0:
        promote = bool(promote)
        rollback = bool(rollback)
    return {"d_lower": d_lo, "d_upper": d_hi, "llr_rollback": llr_rollback, "llr_promote": llr_promote,
            "rollback_at": upper, "promote_at": lower, "rollback": rollback, "promote": promote}


# p99 <= latency_p99_ms is "at most 1 % of calls slower than it".
SLOW_SHARE = 0.01
# Share of the latency test's budget spent on the bound of production's slow share.
REFERENCE_SHARE = 0.2


def latency_test(slow, timed, base_slow, base_timed, false_rollback: float) -> dict:
    """The sequential latency test against production on the same traffic (pure; arrays work).

    A call is slow when it took longer than rollout.latency_p99_ms. The candidate may be
    as slow as production, and as slow as the limit allows: allowed = max(SLOW_SHARE,
    u), u the upper end of a confidence sequence of production's slow share at
    REFERENCE_SHARE of `false_rollback` (without production's counts, SLOW_SHARE alone:
    the absolute p99 limit). The candidate's slow calls then get the SPRT of
    design_rates(allowed), rolling back at log(1/(false_rollback * (1 - REFERENCE_SHARE))).
    The LLR falls as `allowed` grows, and on the event that production's sequence covers
    its share (chance >= 1 - REFERENCE_SHARE * false_rollback) allowed is at least
    max(SLOW_SHARE, production's true share) at every look: so a candidate whose slow
    share is at most half of that is rolled back with chance <= false_rollback (Ville's
    inequality on the SPRT at the true allowance, plus the miss of the sequence).
    `llr_promote` is the same LLR at the lower end (max(SLOW_SHARE, production's lower
    bound)): the larger of the two, the conservative side for showing the candidate
    within its allowance (decide's final promotion).

    slow 8, timed 200, no production counts, false_rollback 0.01: allowed 0.01,
    p0 0.005, p1 0.02: 8 log 4 + 192 log(0.98/0.995) = 11.09 - 2.92 = 8.17 >=
    log(1/0.008) = 4.83: rollback.
    """
    slow = np.asarray(slow, dtype=np.float64)
    timed = np.asarray(timed, dtype=np.float64)
    base_timed = np.asarray(base_timed, dtype=np.float64)
    lo, u = confidence_sequence(base_slow, base_timed, false_rollback * REFERENCE_SHARE, prior_mean=SLOW_SHARE)
    allowed = np.where(base_timed > 0, np.maximum(SLOW_SHARE, u), SLOW_SHARE)
    allowed_lo = np.where(base_timed > 0, np.maximum(SLOW_SHARE, lo), SLOW_SHARE)

    def llr_at(a):
        p0, p1 = 0.5 * a, np.minimum(2.0 * a, (1.0 + a) / 2.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = slow * np.log(p1 / p0) + (timed - slow) * np.log((1.0 - p1) / (1.0 - p0))
        return np.nan_to_num(out, nan=0.0)

    llr, llr_promote = llr_at(allowed), llr_at(allowed_lo)
    at = math.log(1.0 / (false_rollback * (1.0 - REFERENCE_SHARE)))
    rollback = llr >= at
    if np.ndim(llr) == 0:
        return {"allowed": float(allowed), "llr": float(llr), "llr_promote": float(llr_promote), "rollback_at": at,
                "rollback": bool(rollback)}
    return {"allowed": allowed, "llr": llr, "llr_promote": llr_promote, "rollback_at": at, "rollback": rollback}


# ---------------------------------------------------------------------------------------

def _invalid(c: Counts, by_disagreements: bool = False) -> Optional[str]:
    """Why counts cannot be used (a counter reset or a broken source), or None."""
    for name in ("requests", "errors", "compared", "disagreements", "labelled", "negative_flips",
                 "labelled_disagreements", "timed", "slow", "base_timed", "base_slow"):
        if getattr(c, name) < 0:
            return f"negative {name} ({getattr(c, name)})"
    if c.errors > c.requests:
        return f"errors {c.errors} > requests {c.requests}"
    if c.disagreements > c.compared:
        return f"disagreements {c.disagreements} > compared {c.compared}"
    if c.negative_flips > c.labelled:
        return f"negative_flips {c.negative_flips} > labelled {c.labelled}"
    if c.slow > c.timed or c.base_slow > c.base_timed:
        return f"slow calls above timed calls ({c.slow}/{c.timed}, production {c.base_slow}/{c.base_timed})"
    if by_disagreements and c.negative_flips > c.labelled_disagreements:
        # a flip is a disagreement: a source without this counter cannot feed this test
        return (f"negative_flips {c.negative_flips} > labelled_disagreements {c.labelled_disagreements} "
                f"(does the metric source report labelled_disagreements?)")
    return None


def decide(obs: Optional[Observation], step: Optional[RolloutStep], policy: RolloutSpec, *,
           disagreement_share: Optional[float] = None, min_errors: Optional[int] = None,
           min_latency_requests: Optional[int] = None) -> Decision:
    """Promote / hold / rollback / inconclusive for the current step (pure).

    obs None (metric source down) or unusable counts -> "inconclusive", never a rollback.
    step None = the shadow phase: bake policy.shadow_bake_seconds, min counts of steps[0].

    Rollback (any time, no bake), each test on the rollout's totals at its share of
    false_rollback_rate (`rollout.rollback_budget`), so that the chance of any false
    rollback over the whole rollout is at most false_rollback_rate: the NFR test
    (`rollout.nfr_test`) reaches its upper boundary; or the error SPRT (error_rate_limit
    vs twice it) does with at least `min_errors` errors; or `latency_test` shows the
    candidate's share of calls slower than latency_p99_ms above the share allowed, with
    at least `min_latency_requests` timed calls. A slow share above the allowed one that
    is not shown yet holds (never promotes).
    Promote: bake time, min_requests done, and either min_labels labelled with the NFR
    SPRT at or below log(false_promote_rate * (1 - disagreement_share)), or min_labels
    compared samples with the disagreement SPRT at or below
    log(false_promote_rate * disagreement_share). Otherwise hold.
    The keyword knobs default to the policy's keys of the same names (`rollout.*`).
    """
    disagreement_share = policy.disagreement_share if disagreement_share is None else disagreement_share
    min_errors = policy.min_errors if min_errors is None else min_errors
    min_latency_requests = policy.min_latency_requests if min_latency_requests is None else min_latency_requests
    if obs is None:
        return Decision(INCONCLUSIVE, "metric source down: no observation", {})
    by_dis = policy.nfr_test == "disagreements"
    for where, c in (("total", obs.total), ("step", obs.step)):
        why = _invalid(c, by_dis)
        if why:
            return Decision(INCONCLUSIVE, f"unusable {where} counts: {why}", {})

    gate = step if step is not None else policy.steps[0]
    bake = step.bake_seconds if step is not None else policy.shadow_bake_seconds
    t, s = obs.total, obs.step
    budget = policy.rollback_budget
    p0, p1 = design_rates(policy.nfr_limit)
    beta_nfr = policy.false_promote_rate * (1.0 - disagreement_share)
    beta_dis = policy.false_promote_rate * disagreement_share
    lower_nfr, upper = sprt_bounds(policy.false_rollback_rate * budget.nfr, beta_nfr)
    llr_nfr = sprt_llr(t.negative_flips, t.labelled, p0, p1)
    llr_dis = sprt_llr(t.disagreements, t.compared, p0, p1)
    lower_dis = math.log(beta_dis) if beta_dis > 0 else -math.inf
    nfr_lo, nfr_hi = confidence_sequence(t.negative_flips, t.labelled,
                                         min(policy.false_rollback_rate, policy.false_promote_rate),
                                         prior_mean=policy.nfr_limit)
    lat = latency_test(t.slow, t.timed, t.base_slow, t.base_timed, policy.false_rollback_rate * budget.latency)
    stats: dict[str, float] = {
        "live_nfr": t.negative_flips / t.labelled if t.labelled else 0.0,
        "nfr_lower": nfr_lo, "nfr_upper": nfr_hi,
        "labelled": float(t.labelled), "negative_flips": float(t.negative_flips),
        "llr_nfr": llr_nfr, "llr_promote_at": lower_nfr, "llr_rollback_at": upper,
        "disagreement": t.disagreements / t.compared if t.compared else 0.0,
        "compared": float(t.compared), "disagreements": float(t.disagreements),
        "llr_disagreement": llr_dis, "llr_disagreement_promote_at": lower_dis,
        "requests": float(t.requests), "errors": float(t.errors),
        "error_rate": t.errors / t.requests if t.requests else 0.0,
        "llr_error": _error_llr(t.errors, t.requests, policy.error_rate_limit),
        "llr_error_rollback_at": math.log(1.0 / (policy.false_rollback_rate * budget.errors)),
        "timed": float(t.timed), "slow": float(t.slow), "base_timed": float(t.base_timed),
        "base_slow": float(t.base_slow), "slow_share": t.slow / t.timed if t.timed else 0.0,
        "slow_allowed": lat["allowed"], "llr_latency": lat["llr"], "llr_latency_rollback_at": lat["rollback_at"],
        "llr_latency_promote": lat["llr_promote"], "llr_final_promote_at": math.log(policy.false_promote_rate),
        "step_requests": float(s.requests), "step_labelled": float(s.labelled),
        "step_elapsed_s": float(obs.step_elapsed_s),
    }
    # The p99 gauge is shown, not tested (NaN or negative: unknown, left out).
    if s.latency_p99_ms is not None and 0 <= s.latency_p99_ms < math.inf:
        stats["latency_p99_ms"] = float(s.latency_p99_ms)
    # JSON has no infinity: an LLR of +-inf is stored as +-1e9.
    stats = _finite(stats)

    if by_dis:
        return _decide_by_disagreements(obs, policy, step, gate, bake, stats, min_errors, min_latency_requests)

    nfr_txt = f"NFR {t.negative_flips}/{t.labelled}"
    if llr_nfr >= upper:
        return Decision(ROLLBACK, f"{nfr_txt} shown above the limit {policy.nfr_limit:g}: "
                        f"LLR {llr_nfr:.2f} >= {upper:.2f} (SPRT {p0:g} vs {p1:g})", stats)
    other = _checks_before_nfr(obs, policy, stats, min_errors, min_latency_requests)
    if other is not None:
        return other

    waiting = _waiting(obs, gate, bake)
    nfr_ok = llr_nfr <= lower_nfr
    dis_ok = llr_dis <= lower_dis
    if waiting:
        return Decision(HOLD, "waiting: " + ", ".join(waiting) + f"; {nfr_txt}, LLR {llr_nfr:.2f}", stats)
    if (nfr_ok and s.labelled >= gate.min_labels) or (dis_ok and s.compared >= gate.min_labels):
        final = _final_checks(obs, policy, step, stats)
        if final is not None:
            return final
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


def guard_decision(obs: Optional[Observation], policy: RolloutSpec) -> Decision:
    """The watch after promotion (`rollout.guard`): rollback, inconclusive or hold as
    decide() says on the rollout's totals (the same tests, the same budget: the guard is
    part of the rollout), and promote (the guard passed) once `guard.labels` labelled
    samples (labelled disagreements with nfr_test disagreements) arrived since it started
    or `guard.seconds` passed, whichever comes first; a hold until then.

    guard labels 500: 0 flips in 480 labels since it began -> hold ("guarding: labels
    480/500"); 20 more -> promote; 12 flips in 300 (LLR 12 log 4 - 288 * 0.01519 = 12.26)
    -> rollback at any time.
    """
    watch = RolloutStep(weight=1.0, bake_seconds=0.0, min_requests=0, min_labels=0)
    d = decide(obs, watch, policy)
    if d.kind in (ROLLBACK, INCONCLUSIVE) or obs is None:
        return d
    g = policy.guard
    labels = obs.step.labelled_disagreements if policy.nfr_test == "disagreements" else obs.step.labelled
    done = [f"{labels} labels since promotion" if g.labels and labels >= g.labels else "",
            f"{obs.step_elapsed_s:.0f} s since promotion" if g.seconds and obs.step_elapsed_s >= g.seconds else ""]
    stats = {**d.stats, "guard_labels": float(labels)}
    if any(done):
        return Decision(PROMOTE, f"guard passed without a regression: {' and '.join(x for x in done if x)}",
                        stats)
    left = ([f"labels {labels}/{g.labels}"] if g.labels else []) + \
           ([f"{obs.step_elapsed_s:.0f}/{g.seconds:g} s"] if g.seconds else [])
    return Decision(HOLD, f"guarding: {', '.join(left)}; {d.reason}", stats)


def _final_checks(obs: Observation, policy: RolloutSpec, step: Optional[RolloutStep],
                  stats: dict) -> Optional[Decision]:
    """What the last step's promotion (to production) waits for besides the NFR: the error
    rate and the slow share shown within their limits on the rollout's totals (each SPRT
    at or below log(false_promote_rate)), so that a candidate bad on errors or latency
    alone is promoted with chance <= false_promote_rate too. A hold, or None. Left out:
    the error test with error_rate_limit 0 (no error rate is under it), the latency test
    without timed calls (a source that does not count them).

    Limit 1 %, 0 errors in 200 requests: 200 log(0.98/0.99) = -2.03 > log 0.05 = -3.00:
    hold; in 300: -3.05: shown.
    """
    if step is None or step != policy.steps[-1]:  # the shadow phase or an earlier step
        return None
    t, at = obs.total, stats["llr_final_promote_at"]
    waits = []
    if policy.error_rate_limit > 0 and stats["llr_error"] > at:
        waits.append(f"error rate {t.errors}/{t.requests} not yet shown under {policy.error_rate_limit:g} "
                     f"(LLR {stats['llr_error']:.2f} > {at:.2f})")
    if t.timed > 0 and stats["llr_latency_promote"] > at:
        waits.append(f"slow share {t.slow}/{t.timed} not yet shown within its allowance "
                     f"(LLR {stats['llr_latency_promote']:.2f} > {at:.2f})")
    if not waits:
        return None
    return Decision(HOLD, "waiting before the last promotion: " + "; ".join(waits), stats)


def _finite(stats: dict) -> dict:
    return {k: max(-1e9, min(1e9, float(v))) for k, v in stats.items()}


def _waiting(obs: Observation, gate: RolloutStep, bake: float) -> list[str]:
    """What a promotion still waits for besides the evidence: bake time, step requests."""
    out = []
    if obs.step_elapsed_s < bake:
        out.append(f"bake {obs.step_elapsed_s:.0f}/{bake:g} s")
    if obs.step.requests < gate.min_requests:
        out.append(f"requests {obs.step.requests}/{gate.min_requests}")
    return out


def _checks_before_nfr(obs: Observation, policy: RolloutSpec, stats: dict, min_errors: int,
                       min_latency_requests: int) -> Optional[Decision]:
    """The error-rate and latency tests on the rollout's totals, shared by both NFR
    tests: a rollback or a hold, or None."""
    t = obs.total
    if t.errors >= min_errors and stats["llr_error"] >= stats["llr_error_rollback_at"]:
        return Decision(ROLLBACK, f"error rate {t.errors}/{t.requests} = {stats['error_rate']:.4f} shown above "
                        f"the limit {policy.error_rate_limit:g}: LLR {stats['llr_error']:.2f} >= "
                        f"{stats['llr_error_rollback_at']:.2f}", stats)
    if t.timed < min_latency_requests or stats["slow_share"] <= stats["slow_allowed"]:
        return None
    txt = (f"{t.slow}/{t.timed} candidate calls slower than {policy.latency_p99_ms:g} ms "
           f"(share {stats['slow_share']:.4f}; allowed {stats['slow_allowed']:.4f}, production {t.base_slow}/"
           f"{t.base_timed})")
    if stats["llr_latency"] >= stats["llr_latency_rollback_at"]:
        return Decision(ROLLBACK, f"latency shown worse: {txt}; LLR {stats['llr_latency']:.2f} >= "
                        f"{stats['llr_latency_rollback_at']:.2f}", stats)
    return Decision(HOLD, f"latency not yet shown within the limit: {txt}; LLR {stats['llr_latency']:.2f} < "
                    f"{stats['llr_latency_rollback_at']:.2f}", stats)


def _decide_by_disagreements(obs: Observation, policy: RolloutSpec, step: Optional[RolloutStep], gate: RolloutStep,
                             bake: float, stats: dict, min_errors: int, min_latency_requests: int) -> Decision:
    """decide() with `rollout.nfr_test: disagreements`: disagreement_test on the totals;
    the step's `min_labels` counts labelled disagreements (or, for a promotion on the
    disagreement rate alone, compared samples)."""
    t, s = obs.total, obs.step
    dt = disagreement_test(t.compared, t.disagreements, t.labelled_disagreements, t.negative_flips,
                           policy.nfr_limit, policy.false_rollback_rate * policy.rollback_budget.nfr,
                           policy.false_promote_rate,
                           policy.disagreement_share)
    share = t.negative_flips / t.labelled_disagreements if t.labelled_disagreements else 0.0
    # The labelled test's NFR numbers would read flips among flagged requests only: here
    # the NFR is d * q, and its reported bounds the product of d's and q's sequences.
    q_lo, q_hi = confidence_sequence(t.negative_flips, t.labelled_disagreements,
                                     min(policy.false_rollback_rate, policy.false_promote_rate), prior_mean=0.5)
    stats.update({"d_lower": dt["d_lower"], "d_upper": dt["d_upper"], "llr_nfr": dt["llr_rollback"],
                  "llr_nfr_promote": dt["llr_promote"], "llr_rollback_at": dt["rollback_at"],
                  "llr_promote_at": dt["promote_at"], "labelled_disagreements": float(t.labelled_disagreements),
                  "flip_share": share, "live_nfr": (t.disagreements / t.compared if t.compared else 0.0) * share,
                  "nfr_lower": dt["d_lower"] * q_lo, "nfr_upper": dt["d_upper"] * q_hi})
    stats = _finite(stats)
    txt = (f"{t.negative_flips} flips in {t.labelled_disagreements} labelled disagreements, disagreement "
           f"{t.disagreements}/{t.compared} in [{dt['d_lower']:.4f}, {dt['d_upper']:.4f}]")
    if dt["rollback"]:
        return Decision(ROLLBACK, f"NFR shown above the limit {policy.nfr_limit:g}: {txt}; LLR "
                        f"{dt['llr_rollback']:.2f} >= {dt['rollback_at']:.2f}", stats)
    other = _checks_before_nfr(obs, policy, stats, min_errors, min_latency_requests)
    if other is not None:
        return other
    waiting = _waiting(obs, gate, bake)
    if waiting:
        return Decision(HOLD, "waiting: " + ", ".join(waiting) + f"; {txt}", stats)
    if dt["promote"]:
        by_rate = dt["d_upper"] < design_rates(policy.nfr_limit)[1]
        have, need = (s.compared, "compared samples") if by_rate else (s.labelled_disagreements,
                                                                        "labelled disagreements")
        if have >= gate.min_labels:
            final = _final_checks(obs, policy, step, stats)
            if final is not None:
                return final
            why = ("the disagreement rate alone bounds it" if by_rate else
                   f"LLR {dt['llr_promote']:.2f} <= {dt['promote_at']:.2f}")
            return Decision(PROMOTE, f"NFR shown under the limit {policy.nfr_limit:g}: {txt}; {why}", stats)
        return Decision(HOLD, f"waiting: {need} {have}/{gate.min_labels}; {txt}", stats)
    return Decision(HOLD, f"not yet shown: {txt}; LLR in ({dt['promote_at']:.2f}, {dt['rollback_at']:.2f}) "
                    f"at d's ends: {dt['llr_promote']:.2f}, {dt['llr_rollback']:.2f}", stats)


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
