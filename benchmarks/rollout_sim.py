"""Simulated rollouts: our sequential rules against the peers' canary analyses, with labels
that arrive late.

Traffic. A rollout sees PER_TICK = 50 compared samples a tick (one tick = one minute of
traffic, the controller looks after every tick) for at most TICKS = 400 ticks (20,000
samples). Each sample: the candidate disagrees with production with chance d (the
disagreement rate: 2, 5, 10, 20 %); a negative flip (production right, candidate wrong)
with chance p = ratio * nfr_limit (limit 1 %, ratio 0.5, 1, 2, 4), all flips being
disagreements (so p <= d: a (ratio, d) with p > d cannot exist and has no row).

Labels and their delays (on the traffic clock, in minutes): `none` (a label arrives in
the tick its request was served), `exponential` (mean 30), `heavy_tailed` (log-normal,
median 30, sigma 1.5: a tenth arrive after 200 minutes, one in a hundred after 16
hours) and `correlated` (labels of samples the candidate got wrong arrive after an
exponential of mean 10, the others of mean 60: complaints come first). A rule sees, at
each tick, the labels that have arrived by then.

Rules.
- `ours`: decide()'s labelled NFR test (rollout.nfr_test: labelled) alone, every sample
  labelled: SPRT of 0.5x vs 2x the limit, rollback at LLR >= log(1/0.05), promote at
  LLR <= log(0.05 * 0.8). Labels counted: those arrived at the decision.
- `ours_disagreements`: decide()'s disagreement test (rollout.nfr_test: disagreements):
  only disagreements are labelled; d from every compared sample (known at once, no
  label), the flip share from the labelled disagreements that have arrived. Labels
  counted: labelled disagreements arrived at the decision.
  Both are computed vectorised with decision's own functions and, for `--check`
  rollouts per row, replayed tick by tick through decide() itself (the script fails
  if one decision or label count differs). Both simulate the NFR test alone: their
  one-step gate (gate_policy) is the last step, where decide() also waits for the error
  rate and slow share to be shown within their limits; the gate sets error_rate_limit 0
  (that check left out, no errors drawn) and no call is timed (the latency one left out).
- `fixed_threshold`: what Argo Rollouts / Flagger analyses do with a threshold metric:
  every N arrived labels (in arrival order) make one interval, which succeeds when its
  NFR is <= the limit; 3 successes in a row promote, 3 failures roll back. N swept
  (`fixed_n<N>` rows, no delay); `fixed_threshold` is the smallest N meeting both
  targets (rollback <= 5 % at 0.5x, promote <= 5 % at 2x), run under every delay.
- `kayenta_mw`: Spinnaker's canary judge (Kayenta, Mann-Whitney classifier): every N
  labels of canary traffic and N of baseline traffic (production on other requests)
  make an interval; the canary's per-request errors are compared with the baseline's
  by a one-sided Mann-Whitney U test (normal approximation with the tie correction; on
  0/1 values it has a closed form), and the interval fails when the canary is worse at
  confidence c. 3 passes in a row promote, 3 failures roll back. Production errs on 10 %
  of requests; the candidate on 10 % + p - 1 % (it also fixes 1 % of requests: positive
  flips), so the NFR ratio maps to an error change of -0.5, 0, +1 and +3 points. (N, c)
  swept without delay; `kayenta_mw` is the pair meeting both targets with the fewest
  median labels at 0.5x. Labels counted: both arms. Its rows under delays draw the
  intervals as without delay where delays do not depend on correctness (then the
  labels that arrive are still independent draws), and sample by sample under
  `correlated`.
- `ours_all_checks`: WHOLE rollouts with every check of decide() on at once, through the
  shadow phase and the 3 canary steps of RolloutSpec's default weights (see
  all_checks_policy: bake 5 ticks, min_requests 100, min_labels 20, every other key at its
  default), for nfr_test labelled (every sample labelled, as `ours`) and disagreements
  (as `ours_disagreements`, at each d). Every candidate request is also a timed call and
  an error with chance r_err x error_rate_limit, slow (above latency_p99_ms) with chance
  r_lat x max(1 %, production's 0.5 %); production's call on the same request is slow
  with chance 0.5 %. A good candidate is 0.5x on all three, a bad one 2x (all three, or,
  without delay, one at a time). A step is promoted when decide() says so (step counts:
  totals since the step started; step_elapsed_s = 60 x its ticks); the promotion out of
  the last step also waits for decide()'s final checks (on the totals, the error SPRT
  and the latency LLR at production's lower bound both at or below
  log(false_promote_rate)); the rollout ends rolled back (by the NFR, error or latency
  test), promoted past the last step, or undecided at the horizon. `false_rollback_any`:
  rolled back by any test, for a good candidate (target <= false_rollback_rate = 5 %).
  Vectorised: the tests on totals at
  once, then a loop over ticks for the steps; --check-all rollouts per row replayed
  through decide() step by step (outcome, test, labels and every promotion tick must
  agree). `legacy_per_step` rows: the same draws under the old budget (NFR and latency
  tests at the whole 5 %, the error test on the step's counts at 5 %, restarting at
  every step, and no final checks before the last promotion): simulated by this script,
  not by decide() (that rule is gone).
Every row is 1000 rollouts (--rollouts), seeded; an undecided rollout counts the labels
that had arrived at the horizon.

Run: .venv/bin/python -m benchmarks.rollout_sim --markdown   (about 10 minutes on 2 cores)
Writes benchmarks/results/rollout_sim.json (a list of rows: rule, true_nfr_ratio, delay,
disagreement_rate, rollback_rate, promote_rate, median_labels, undecided_rate,
rollouts, ...) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from orchestrator.config import RolloutSpec, RolloutStep
from orchestrator.rollout.decision import (SLOW_SHARE, Counts, Observation, decide, design_rates, disagreement_test,
                                          latency_test, sprt_bounds, sprt_llr)

# benchmarks.common imports torch for the training benchmarks; this one needs only a path.
RESULTS = Path(__file__).resolve().parent / "results"

LIMIT = 0.01
RATIOS = (0.5, 1.0, 2.0, 4.0)
DIS_RATES = (0.02, 0.05, 0.1, 0.2)
DELAYS = ("none", "exponential", "heavy_tailed", "correlated")
PER_TICK = 50
TICKS = 400
INTERVALS = (100, 200, 300, 400, 500, 600, 800, 1000, 1500, 2000)
KAYENTA_N = (500, 1000, 2000, 4000, 8000)
KAYENTA_CONFIDENCE = (0.8, 0.9, 0.95, 0.98)
KAYENTA_MAX_INTERVALS = 12
BASE_ERROR = 0.10          # production's error rate (kayenta_mw)
RUN = 3
TARGET = 0.05
CHUNK = 200                # rollouts drawn sample by sample at once (memory)


def _rng(seed: int, *key) -> np.random.Generator:
    """One stream per (rule family, ratio, d, delay), independent of the others."""
    return np.random.default_rng([seed, *(sum(map(ord, str(k))) * 1000 + i for i, k in enumerate(key))])


def gate_policy(nfr_test: str = "labelled") -> RolloutSpec:
    """decide()'s NFR statistics alone: one gate, no bake, no minimum counts. The gate is
    the last step, so decide() also runs its final checks before promoting out of it;
    error_rate_limit 0 leaves the error one out (no errors are drawn here) and no timed
    calls leave the latency one out: the NFR test alone decides."""
    return RolloutSpec(nfr_limit=LIMIT, shadow_bake_seconds=0, nfr_test=nfr_test, error_rate_limit=0.0,
                       steps=[RolloutStep(weight=1.0, bake_seconds=0, min_requests=0, min_labels=0)])


def label_delays(rng: np.random.Generator, kind: str, wrong: np.ndarray) -> np.ndarray:
    """Minutes from serving to label, one per sample; `wrong`: the candidate erred."""
    n = wrong.shape
    if kind == "none":
        return np.zeros(n)
    if kind == "exponential":
        return rng.exponential(30.0, n)
    if kind == "heavy_tailed":
        return rng.lognormal(math.log(30.0), 1.5, n)
    if kind == "correlated":
        return np.where(wrong, rng.exponential(10.0, n), rng.exponential(60.0, n))
    raise ValueError(kind)


def arrivals(rows: np.ndarray, served: np.ndarray, delay: np.ndarray, weight: np.ndarray, n: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (labels, weighted labels) arrived by each tick, (n, TICKS) each: a label
    served at tick s with delay D arrives at tick s + ceil(D) (s itself when D = 0)."""
    at = served + np.ceil(delay).astype(np.int64)
    keep = at < TICKS
    idx = rows[keep] * TICKS + at[keep]
    count = np.bincount(idx, minlength=n * TICKS).reshape(n, TICKS).cumsum(axis=1)
    hits = np.bincount(idx, weights=weight[keep], minlength=n * TICKS).reshape(n, TICKS).cumsum(axis=1)
    return count, hits.round().astype(np.int64)


def _first(rollback: np.ndarray, promote: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kind, index) of the first column with a decision per row, rollback winning a tie
    (as in decide); kind +1 rollback, -1 promote, 0 none (index = last column then)."""
    any_ = rollback | promote
    has = any_.any(axis=1)
    first = np.where(has, any_.argmax(axis=1), rollback.shape[1] - 1)
    rows = np.arange(rollback.shape[0])
    kind = np.where(~has, 0, np.where(rollback[rows, first], 1, -1))
    return kind, first


def _summary(rule: str, ratio: float, delay: str, d, kind: np.ndarray, labels: np.ndarray, **extra) -> dict:
    return {"rule": rule, "true_nfr_ratio": ratio, "delay": delay, "disagreement_rate": d,
            "rollback_rate": float(np.mean(kind == 1)), "promote_rate": float(np.mean(kind == -1)),
            "median_labels": float(np.median(labels)), "undecided_rate": float(np.mean(kind == 0)),
            "rollouts": int(kind.size), **extra}


# --- every sample labelled: ours, fixed_threshold ----------------------------------------------

def labelled_stream(rng: np.random.Generator, n: int, ratio: float, delay: str):
    """Per chunk of rollouts: (rows, served tick, arrival minutes, flip) of every sample."""
    p = ratio * LIMIT
    for lo in range(0, n, CHUNK):
        m = min(CHUNK, n - lo)
        served = np.tile(np.repeat(np.arange(TICKS), PER_TICK), m)
        rows = np.repeat(np.arange(m), TICKS * PER_TICK)
        flip = rng.random(served.size) < p
        yield rows, served, label_delays(rng, delay, flip), flip


def labelled_counts(rng, n: int, ratio: float, delay: str) -> dict[str, np.ndarray]:
    """Cumulative labels and flips arrived by each tick, (n, TICKS): every sample labelled."""
    labels, flips = [], []
    for rows, served, dl, flip in labelled_stream(rng, n, ratio, delay):
        lab, fl = arrivals(rows, served, dl, flip.astype(float), rows[-1] + 1)
        labels.append(lab)
        flips.append(fl)
    labels, flips = np.concatenate(labels), np.concatenate(flips)
    zero = np.zeros_like(labels)
    return {"compared": zero, "disagreements": zero, "labelled": labels, "labelled_disagreements": zero,
            "negative_flips": flips}


def ours_labelled(counts: dict, policy: RolloutSpec):
    """decide()'s labelled NFR test on cumulative counts, all rollouts and ticks at once."""
    p0, p1 = design_rates(policy.nfr_limit)
    lower, upper = sprt_bounds(policy.false_rollback_rate * policy.rollback_budget.nfr,
                               policy.false_promote_rate * (1 - policy.disagreement_share))
    labels = counts["labelled"]
    llr = sprt_llr(counts["negative_flips"], labels, p0, p1)
    kind, at = _first(llr >= upper, llr <= lower)
    return kind, labels[np.arange(labels.shape[0]), at]


def _runs(ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(RUN successes in a row reached, RUN failures in a row reached) per interval."""
    n, k = ok.shape
    good, bad = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    pro, rb = np.zeros_like(ok), np.zeros_like(ok)
    for j in range(k):
        good = np.where(ok[:, j], good + 1, 0)
        bad = np.where(ok[:, j], 0, bad + 1)
        pro[:, j], rb[:, j] = good >= RUN, bad >= RUN
    return pro, rb


def fixed_rule(rng, n: int, ratio: float, delay: str, interval: int):
    """The fixed-threshold analysis on the arrived labels in arrival order."""
    kinds, used = [], []
    k = TICKS * PER_TICK // interval
    for rows, served, dl, flip in labelled_stream(rng, n, ratio, delay):
        m = rows[-1] + 1
        at = served + np.ceil(dl)
        order = np.lexsort((served, at, rows))           # per rollout, by arrival
        arrived = (at[order] < TICKS).reshape(m, -1)
        f = flip[order].reshape(m, -1)
        n_arrived = arrived.sum(axis=1)
        f_int = f[:, :k * interval].reshape(m, k, interval).sum(axis=2)
        done = (np.arange(1, k + 1)[None, :] * interval) <= n_arrived[:, None]
        ok = f_int <= LIMIT * interval + 1e-9
        pro, rb = _runs(ok)
        kind, first = _first(rb & done, pro & done)
        kinds.append(kind)
        used.append(np.where(kind == 0, n_arrived, (first + 1) * interval))
    return np.concatenate(kinds), np.concatenate(used)


# --- labels only on disagreements ---------------------------------------------------------------

def disagreement_counts(rng, n: int, ratio: float, d: float, delay: str) -> dict[str, np.ndarray]:
    """Cumulative compared samples, disagreements, labelled disagreements and flips arrived
    by each tick, (n, TICKS) each: every disagreement is sent for a label, nothing else."""
    q = ratio * LIMIT / d
    dis = rng.binomial(PER_TICK, d, size=(n, TICKS))
    rows = np.repeat(np.repeat(np.arange(n), TICKS), dis.ravel())
    served = np.repeat(np.tile(np.arange(TICKS), n), dis.ravel())
    flip = rng.random(served.size) < q
    labels, flips = arrivals(rows, served, label_delays(rng, delay, flip), flip.astype(float), n)
    compared = np.broadcast_to(PER_TICK * np.arange(1, TICKS + 1), (n, TICKS))
    return {"compared": compared, "disagreements": dis.cumsum(axis=1), "labelled": labels,
            "labelled_disagreements": labels, "negative_flips": flips}


def ours_disagreements(counts: dict, policy: RolloutSpec):
    """decide()'s disagreement test (decision.disagreement_test), all rollouts and ticks at once."""
    res = disagreement_test(counts["compared"], counts["disagreements"], counts["labelled_disagreements"],
                            counts["negative_flips"], policy.nfr_limit,
                            policy.false_rollback_rate * policy.rollback_budget.nfr,
                            policy.false_promote_rate, policy.disagreement_share)
    kind, at = _first(res["rollback"], res["promote"])
    labels = counts["labelled"]
    return kind, labels[np.arange(labels.shape[0]), at]


def through_decide(counts: dict, policy: RolloutSpec, rollouts: int):
    """The first `rollouts` rollouts tick by tick through decide() itself (one gate)."""
    kinds, used = [], []
    labels = counts["labelled"]
    for r in range(rollouts):
        kind, n_used = 0, int(labels[r, -1])
        for t in range(TICKS):
            c = Counts(requests=int(labels[r, t]) + int(counts["compared"][r, t]),
                       **{k: int(v[r, t]) for k, v in counts.items()})
            dec = decide(Observation(total=c, step=c, step_elapsed_s=float(t + 1)), policy.steps[0], policy)
            if dec.kind in ("rollback", "promote"):
                kind, n_used = (1 if dec.kind == "rollback" else -1), int(labels[r, t])
                break
        kinds.append(kind)
        used.append(n_used)
    return np.array(kinds), np.array(used)


def checked(rule, counts: dict, policy: RolloutSpec, check: int, what: str):
    """rule(counts, policy), after the first `check` rollouts agreed with decide() exactly."""
    kind, used = rule(counts, policy)
    c = min(check, kind.size)
    if c:
        k2, u2 = through_decide({k: v[:c] for k, v in counts.items()}, policy, c)
        if not (np.array_equal(k2, kind[:c]) and np.array_equal(u2, used[:c])):
            raise SystemExit(f"{what}: the vectorised rule and decide() disagree")
    return kind, used, c


# --- Kayenta's Mann-Whitney judge ----------------------------------------------------------------

def mann_whitney_z(a, b, n: int):
    """z of the one-sided Mann-Whitney U test "canary above baseline" for two samples of n
    0/1 values with a and b ones (normal approximation, tie-corrected).

    U = a (n - b) + (a b + (n - a)(n - b)) / 2 (pairs canary 1 > baseline 0, ties half);
    E U = n^2 / 2; Var U = n^2 / 12 * ((2n + 1) - sum(t^3 - t) / (2n (2n - 1))) over the two
    tie groups t (the ones, a + b, and the zeros). a = 3, b = 1, n = 10: U = 27 + (3 + 63)/2
    = 60, E U = 50, ties 4 and 16: sum = 60 + 4080 = 4140, Var = 100/12 * (21 - 4140/380)
    = 84.21, z = 10 / 9.177 = 1.090.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    u = a * (n - b) + (a * b + (n - a) * (n - b)) / 2
    t1, t0 = a + b, 2 * n - a - b
    ties = (t1 ** 3 - t1) + (t0 ** 3 - t0)
    var = n * n / 12.0 * ((2 * n + 1) - ties / (2 * n * (2 * n - 1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, (u - n * n / 2) / np.sqrt(np.maximum(var, 1e-300)), 0.0)


def kayenta_errors(rng, n: int, ratio: float, delay: str, interval: int):
    """Errors per interval of `interval` arrived labels, canary and baseline, (n, K) each."""
    p_c = BASE_ERROR + ratio * LIMIT - LIMIT
    if delay != "correlated":
        k = KAYENTA_MAX_INTERVALS
        return (rng.binomial(interval, p_c, size=(n, k)), rng.binomial(interval, BASE_ERROR, size=(n, k)),
                np.full(n, k * interval))
    # Errors' labels arrive first: take each arm's labels in arrival order, sample by sample.
    total = interval * KAYENTA_MAX_INTERVALS
    rate = total / TICKS        # requests a tick per arm, so the horizon holds them all
    out, arrived = [], []
    for p in (p_c, BASE_ERROR):
        errs, got = [], []
        for lo in range(0, n, 20):
            m = min(20, n - lo)
            wrong = rng.random((m, total)) < p
            served = np.floor(np.arange(total) / rate)[None, :]
            at = served + np.ceil(label_delays(rng, delay, wrong))
            order = np.argsort(at, axis=1, kind="stable")
            w = np.take_along_axis(wrong, order, axis=1)
            errs.append(w.reshape(m, KAYENTA_MAX_INTERVALS, interval).sum(axis=2))
            got.append((at < TICKS).sum(axis=1))
        out.append(np.concatenate(errs))
        arrived.append(np.concatenate(got))
    return out[0], out[1], np.minimum(arrived[0], arrived[1])


def kayenta_rule(rng, n: int, ratio: float, delay: str, interval: int, confidence: float):
    canary, baseline, n_arrived = kayenta_errors(rng, n, ratio, delay, interval)
    z_crit = _z(confidence)
    fail = mann_whitney_z(canary, baseline, interval) > z_crit
    pro, rb = _runs(~fail)
    done = (np.arange(1, canary.shape[1] + 1)[None, :] * interval) <= n_arrived[:, None]
    kind, first = _first(rb & done, pro & done)
    labels = 2 * np.where(kind == 0, np.minimum(n_arrived, canary.shape[1] * interval), (first + 1) * interval)
    return kind, labels


def _z(confidence: float) -> float:
    """The standard normal quantile at `confidence` (bisection on erf: no scipy needed here)."""
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < confidence else (lo, mid)
    return lo


# --- whole rollouts, every check on: ours_all_checks ------------------------------------------------

TICK_S = 60.0              # one tick is a minute of traffic: step_elapsed_s = 60 x ticks in the step
ALL_BAKE_S = 300.0         # shadow phase and every step bake 5 ticks
ALL_MIN_REQUESTS = 100     # the shipped default (2 ticks of traffic)
ALL_MIN_LABELS = 20        # shipped 100: at d = 2 % (one labelled disagreement a tick) 4 x 100 would not fit
PROD_SLOW = 0.005          # production's share of calls slower than latency_p99_ms
ALL_GOOD, ALL_BAD = 0.5, 2.0
OUTCOMES = {0: "undecided", -1: "promoted", 1: "nfr", 2: "errors", 3: "latency"}


def all_checks_policy(nfr_test: str = "labelled") -> RolloutSpec:
    """The shipped steps (RolloutSpec's default weights: a shadow phase, then 3 canary
    steps) with bake 5 ticks and min_labels 20 (module constants), every other key at
    its default: error_rate_limit 1 %, min_errors 5, min_latency_requests 100,
    rollback_budget nfr 0.6 / errors 0.2 / latency 0.2 of false_rollback_rate 0.05."""
    steps = [RolloutStep(weight=s.weight, bake_seconds=ALL_BAKE_S, min_requests=ALL_MIN_REQUESTS,
                         min_labels=ALL_MIN_LABELS) for s in RolloutSpec().steps]
    return RolloutSpec(nfr_limit=LIMIT, nfr_test=nfr_test, shadow_bake_seconds=ALL_BAKE_S, steps=steps)


def all_checks_counts(rng, n: int, nfr_test: str, ratios: tuple[float, float, float], d, delay: str
                      ) -> dict[str, np.ndarray]:
    """Cumulative counts by each tick, (n, TICKS), of every check at once. `ratios`: the
    candidate's NFR, error rate and slow share as multiples of nfr_limit, error_rate_limit
    and max(1 %, production's slow share). Every candidate request is a compared sample
    and a timed call, and so is production's on the same request (both drawn per call)."""
    policy = all_checks_policy(nfr_test)
    r_nfr, r_err, r_lat = ratios
    c = (labelled_counts(rng, n, r_nfr, delay) if nfr_test == "labelled"
         else disagreement_counts(rng, n, r_nfr, d, delay))
    c = {k: np.ascontiguousarray(v) for k, v in c.items()}
    served = np.broadcast_to(PER_TICK * np.arange(1, TICKS + 1), (n, TICKS)).copy()
    c["requests"] = served
    c["timed"] = c["base_timed"] = served
    c["errors"] = rng.binomial(PER_TICK, r_err * policy.error_rate_limit, (n, TICKS)).cumsum(axis=1)
    c["slow"] = rng.binomial(PER_TICK, r_lat * max(SLOW_SHARE, PROD_SLOW), (n, TICKS)).cumsum(axis=1)
    c["base_slow"] = rng.binomial(PER_TICK, PROD_SLOW, (n, TICKS)).cumsum(axis=1)
    return c


def _totals_tests(c: dict, policy: RolloutSpec, legacy: bool) -> dict[str, np.ndarray]:
    """What decide() concludes from the rollout's totals alone, every rollout and tick at
    once: which test rolls back (1 NFR, 2 errors, 3 latency, 0 none; decide's order),
    the latency hold, and the NFR test's promote evidence with the step count it needs.
    legacy: the old budget (every test at the whole false_rollback_rate; the error test
    is left to the step loop, on step counts) and no final checks. `final_ok`: decide's
    final checks pass (only the last step's promotion reads it)."""
    a = policy.false_rollback_rate
    budget = policy.rollback_budget
    a_nfr, a_err, a_lat = (a, a, a) if legacy else (a * budget.nfr, a * budget.errors, a * budget.latency)
    p0, p1 = design_rates(policy.nfr_limit)
    s = policy.disagreement_share
    out = {}
    if policy.nfr_test == "labelled":
        lower, upper = sprt_bounds(a_nfr, policy.false_promote_rate * (1 - s))
        llr = sprt_llr(c["negative_flips"], c["labelled"], p0, p1)
        llr_dis = sprt_llr(c["disagreements"], c["compared"], p0, p1)
        rb_nfr = llr >= upper
        out["promote_a"], out["need_a"] = llr <= lower, "labelled"
        out["promote_b"], out["need_b"] = llr_dis <= math.log(policy.false_promote_rate * s), "compared"
    else:
        dt = disagreement_test(c["compared"], c["disagreements"], c["labelled_disagreements"], c["negative_flips"],
                               policy.nfr_limit, a_nfr, policy.false_promote_rate, s)
        rb_nfr = dt["rollback"]
        by_rate = dt["d_upper"] < p1
        out["promote_a"], out["need_a"] = dt["promote"] & ~by_rate, "labelled_disagreements"
        out["promote_b"], out["need_b"] = dt["promote"] & by_rate, "compared"
    # The error SPRT (decision._error_llr's formula: limit against twice it).
    e0, e1 = design_rates(policy.error_rate_limit, low=1.0, high=2.0)
    rb_err = ((c["errors"] >= policy.min_errors)
              & (sprt_llr(c["errors"], c["requests"], e0, e1) >= math.log(1.0 / a_err)))
    # The latency test (decision.latency_test), only where decide() runs it: enough timed
    # calls and a slow share above the allowed one, which is at least SLOW_SHARE.
    timed, slow = c["timed"], c["slow"]
    share = slow / np.maximum(timed, 1)
    maybe = (timed >= policy.min_latency_requests) & (share > SLOW_SHARE)
    rb_lat, hold = np.zeros_like(maybe), np.zeros_like(maybe)
    if maybe.any():
        lt = latency_test(slow[maybe], timed[maybe], c["base_slow"][maybe], c["base_timed"][maybe], a_lat)
        above = share[maybe] > lt["allowed"]
        rb_lat[maybe] = above & lt["rollback"]
        hold[maybe] = above & ~lt["rollback"]
    if legacy:
        rb_err = np.zeros_like(rb_err)   # per step, in the loop
    # decide's final checks (decision._final_checks), before the last step's promotion only:
    # the error SPRT and the latency LLR at production's lower bound, both on the totals,
    # at or below log(false_promote_rate). The old rule had none (legacy: always shown).
    at = math.log(policy.false_promote_rate)
    final = np.ones_like(maybe)
    if not legacy:
        if policy.error_rate_limit > 0 and e1 > e0:
            final &= sprt_llr(c["errors"], c["requests"], e0, e1) <= at
        lt_all = latency_test(slow, timed, c["base_slow"], c["base_timed"], a_lat)
        final &= (timed == 0) | (lt_all["llr_promote"] <= at)
    out["final_ok"] = final
    out["rollback"] = np.where(rb_nfr, 1, np.where(rb_err, 2, np.where(rb_lat, 3, 0)))
    # decide's order: the NFR rollback first, then errors, then latency (rollback or hold).
    out["hold"] = hold & ~rb_nfr & ~rb_err
    return out


def all_checks_rule(c: dict, policy: RolloutSpec, legacy: bool = False):
    """Whole rollouts through the shadow phase and every step, vectorised over rollouts:
    the totals' tests at once (`_totals_tests`), then tick by tick the step each rollout
    is in, its step counts (totals since its step started) and bake; the last step's
    promotion also needs `final_ok`. Returns (outcome:
    0 undecided, -1 promoted past the last step, 1/2/3 rolled back by NFR/errors/latency;
    labels arrived at the end; tick of each promotion, -1 if none, (n, 1 + steps))."""
    tests = _totals_tests(c, policy, legacy)
    n = c["requests"].shape[0]
    rows = np.arange(n)
    last = len(policy.steps)
    bakes = np.array([policy.shadow_bake_seconds] + [st.bake_seconds for st in policy.steps])
    min_req = np.array([st.min_requests for st in policy.steps[:1] + policy.steps])
    min_lab = np.array([st.min_labels for st in policy.steps[:1] + policy.steps])
    phase = np.zeros(n, dtype=np.int64)
    start = np.full(n, -1)
    active = np.ones(n, dtype=bool)
    outcome = np.zeros(n, dtype=np.int64)
    end = np.full(n, TICKS - 1)
    promoted = np.full((n, last + 1), -1)
    e0, e1 = design_rates(policy.error_rate_limit, low=1.0, high=2.0)

    def step(name, t):
        v = c[name]
        return v[:, t] - np.where(start >= 0, v[rows, np.maximum(start, 0)], 0)

    for t in range(TICKS):
        rb = np.where(active, tests["rollback"][:, t], 0)
        hold = tests["hold"][:, t]
        if legacy:  # the old error test: step counts, the whole budget, before latency
            s_err, s_req = step("errors", t), step("requests", t)
            err = ((s_err >= policy.min_errors) & (sprt_llr(s_err, s_req, e0, e1)
                                                   >= math.log(1.0 / policy.false_rollback_rate)))
            rb = np.where(active & (rb != 1) & err, 2, rb)
            hold = hold & ~err
        now = rb > 0
        outcome[now], end[now] = rb[now], t
        active &= ~now
        gate = np.minimum(phase, last)
        ready = (active & ~hold & ((t - start) * TICK_S >= bakes[gate]) & (step("requests", t) >= min_req[gate]))
        a_ok = tests["promote_a"][:, t] & (step(tests["need_a"], t) >= min_lab[gate])
        b_ok = tests["promote_b"][:, t] & (step(tests["need_b"], t) >= min_lab[gate])
        ok = ready & (a_ok | b_ok) & ((phase < last) | tests["final_ok"][:, t])
        promoted[ok, phase[ok]] = t
        phase[ok] += 1
        start[ok] = t
        done = ok & (phase > last)
        outcome[done], end[done] = -1, t
        active &= ~done
        if not active.any():
            break
    label_key = "labelled" if policy.nfr_test == "labelled" else "labelled_disagreements"
    return outcome, c[label_key][rows, end], promoted


def all_checks_through_decide(c: dict, policy: RolloutSpec, rollouts: int):
    """The first `rollouts` whole rollouts tick by tick through decide() itself: step
    counts are the totals since the step started, promote moves to the next step."""
    fields = ("requests", "errors", "compared", "disagreements", "labelled", "negative_flips",
              "labelled_disagreements", "timed", "slow", "base_timed", "base_slow")
    label_key = "labelled" if policy.nfr_test == "labelled" else "labelled_disagreements"
    last = len(policy.steps)
    outs, used, promoted = [], [], np.full((rollouts, last + 1), -1)
    for r in range(rollouts):
        phase, start, outcome, end = 0, -1, 0, TICKS - 1
        base = {k: 0 for k in fields}
        for t in range(TICKS):
            tot = {k: int(c[k][r, t]) for k in fields}
            obs = Observation(total=Counts(**tot), step=Counts(**{k: tot[k] - base[k] for k in fields}),
                              step_elapsed_s=(t - start) * TICK_S)
            dec = decide(obs, None if phase == 0 else policy.steps[phase - 1], policy)
            if dec.kind == "rollback":
                outcome = (1 if dec.reason.startswith("NFR") else 2 if dec.reason.startswith("error rate")
                           else 3 if dec.reason.startswith("latency") else 9)
                end = t
                break
            if dec.kind == "promote":
                promoted[r, phase] = t
                phase, start, base = phase + 1, t, tot
                if phase > last:
                    outcome, end = -1, t
                    break
            elif dec.kind != "hold":
                raise SystemExit(f"all checks: unexpected decision {dec.kind}: {dec.reason}")
        outs.append(outcome)
        used.append(int(c[label_key][r, end]))
    return np.array(outs), np.array(used), promoted


def all_checks_row(rng, n: int, nfr_test: str, ratios: tuple, d, delay: str, check: int) -> list[dict]:
    """The ours_all_checks row (and, on the same draws, its legacy_per_step contrast)."""
    policy = all_checks_policy(nfr_test)
    c = all_checks_counts(rng, n, nfr_test, ratios, d, delay)
    outcome, used, promoted = all_checks_rule(c, policy)
    k = min(check, n)
    if k:
        o2, u2, p2 = all_checks_through_decide({key: v[:k] for key, v in c.items()}, policy, k)
        if not (np.array_equal(o2, outcome[:k]) and np.array_equal(u2, used[:k]) and np.array_equal(p2, promoted[:k])):
            raise SystemExit(f"ours_all_checks ({nfr_test}, {ratios}, d {d}, {delay}): the vectorised rule and "
                             f"decide() disagree")
    out = []
    for rule, (o, u, pr) in (("ours_all_checks", (outcome, used, promoted)),
                             ("legacy_per_step", all_checks_rule(c, policy, legacy=True))):
        kind = np.where(o > 0, 1, o)
        row = _summary(rule, ratios[0], delay, d, kind, u, nfr_test=nfr_test, true_error_ratio=ratios[1],
                       true_latency_ratio=ratios[2], false_rollback_any=float(np.mean(o > 0)),
                       **{f"rollback_by_{name}": float(np.mean(o == code)) for code, name in
                          ((1, "nfr"), (2, "errors"), (3, "latency"))},
                       reached_step=[float(np.mean(pr[:, j] >= 0)) for j in range(pr.shape[1])],
                       median_ticks_to_promote=(float(np.median(pr[o == -1, -1] + 1)) if (o == -1).any() else None))
        if rule == "ours_all_checks":
            row["checked_through_decide"] = k
        else:
            row["simulated_not_decide"] = ("the old scheme: NFR and latency tests on totals at the whole "
                                           "false_rollback_rate, the error test on step counts at it")
        if max(ratios) >= 1:   # some test at its bad rate: a rollback is no false one
            row.pop("false_rollback_any")
        out.append(row)
    return out


ALL_CHECK_CASES = ((ALL_GOOD, ALL_GOOD, ALL_GOOD), (ALL_BAD, ALL_BAD, ALL_BAD))
ONE_BAD = ((ALL_BAD, ALL_GOOD, ALL_GOOD), (ALL_GOOD, ALL_BAD, ALL_GOOD), (ALL_GOOD, ALL_GOOD, ALL_BAD))


def all_checks_rows(args, t0: float) -> list[dict]:
    rows = []
    for delay in DELAYS:
        cases = [(r, "labelled", None) for r in ALL_CHECK_CASES]
        cases += [(r, "disagreements", d) for r in ALL_CHECK_CASES for d in DIS_RATES if _possible(r[0], d)]
        if delay == "none":   # one regression at a time: labelled, and disagreements at d 5 %
            cases += [(r, t, d) for r in ONE_BAD for t, d in (("labelled", None), ("disagreements", 0.05))]
        for ratios, nfr_test, d in cases:
            rows += all_checks_row(_rng(args.seed, "all", nfr_test, *ratios, d, delay), args.rollouts, nfr_test,
                                   ratios, d, delay, args.check_all)
        print(f"all checks, delay {delay} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


# --- the run ---------------------------------------------------------------------------------------

def _meets(rows: list[dict]) -> bool:
    return all((r["true_nfr_ratio"] != 0.5 or r["rollback_rate"] <= TARGET)
               and (r["true_nfr_ratio"] != 2.0 or r["promote_rate"] <= TARGET) for r in rows)


def _possible(ratio: float, d: float) -> bool:
    return ratio * LIMIT <= d + 1e-12


def run(args) -> list[dict]:
    t0 = time.perf_counter()
    rows: list[dict] = []
    labelled, by_dis = gate_policy("labelled"), gate_policy("disagreements")

    # Tune the peers without delay.
    fixed = {n_int: [_summary(f"fixed_n{n_int}", ratio, "none", None,
                              *fixed_rule(_rng(args.seed, "fixed", n_int, ratio), args.rollouts, ratio, "none", n_int),
                              interval_labels=n_int) for ratio in RATIOS] for n_int in INTERVALS}
    rows += [r for v in fixed.values() for r in v]
    tuned_fixed = next((n_int for n_int in INTERVALS if _meets(fixed[n_int])), None)
    kayenta = {}
    for n_int in KAYENTA_N:
        for c in KAYENTA_CONFIDENCE:
            kayenta[(n_int, c)] = [_summary(f"kayenta_n{n_int}_c{c:g}", ratio, "none", None,
                                            *kayenta_rule(_rng(args.seed, "kay", n_int, c, ratio), args.rollouts,
                                                          ratio, "none", n_int, c),
                                            interval_labels_per_arm=n_int, confidence=c) for ratio in RATIOS]
    rows += [r for v in kayenta.values() for r in v]
    ok = [key for key, v in kayenta.items() if _meets(v)]
    tuned_kayenta = min(ok, key=lambda key: kayenta[key][0]["median_labels"]) if ok else None
    print(f"tuned: fixed_threshold N = {tuned_fixed}, kayenta_mw (N, c) = {tuned_kayenta} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    for delay in DELAYS:
        for ratio in RATIOS:
            kind, used, c = checked(ours_labelled, labelled_counts(_rng(args.seed, "ours", ratio, delay),
                                                                   args.rollouts, ratio, delay),
                                    labelled, args.check, f"ours at {ratio}x, {delay}")
            shared = {"ours": (kind, used)}
            if tuned_fixed:
                shared["fixed_threshold"] = fixed_rule(_rng(args.seed, "fixedrun", ratio, delay), args.rollouts,
                                                       ratio, delay, tuned_fixed)
            if tuned_kayenta:
                shared["kayenta_mw"] = kayenta_rule(_rng(args.seed, "kayrun", ratio, delay), args.rollouts, ratio,
                                                    delay, *tuned_kayenta)
            for d in DIS_RATES:
                if not _possible(ratio, d):
                    continue
                for rule, (kind, used) in shared.items():  # every sample labelled: d does not enter
                    rows.append(_summary(rule, ratio, delay, d, kind, used, uses_disagreement_rate=False,
                                         **({"checked_through_decide": c} if rule == "ours" else {})))
                counts = disagreement_counts(_rng(args.seed, "dis", ratio, d, delay), args.rollouts, ratio, d, delay)
                kind, used, c_dis = checked(ours_disagreements, counts, by_dis, args.check,
                                            f"ours_disagreements at {ratio}x, d {d}, {delay}")
                rows.append(_summary("ours_disagreements", ratio, delay, d, kind, used,
                                     uses_disagreement_rate=True, checked_through_decide=c_dis))
        print(f"delay {delay} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows += all_checks_rows(args, t0)
    meta = {"tuned_fixed_interval": tuned_fixed, "tuned_kayenta": list(tuned_kayenta) if tuned_kayenta else None,
            "seconds": round(time.perf_counter() - t0, 1)}
    return rows, meta


MAIN_RULES = ("ours", "ours_disagreements", "fixed_threshold", "kayenta_mw")


def table(rows: list[dict], delay: str) -> list[str]:
    """Markdown: one line per (rule, d) under `delay`; rollback at 0.5x, promote at 2x,
    median labels at 0.5x, 1x, 2x, 4x."""
    out = [f"delay `{delay}`:", "",
           "| rule | d | rollback at 0.5x | promote at 2x | median labels 0.5x | 1x | 2x | 4x |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for rule in MAIN_RULES:
        for d in DIS_RATES:
            sel = {r["true_nfr_ratio"]: r for r in rows if r["rule"] == rule and r["delay"] == delay
                   and r["disagreement_rate"] == d}
            if not sel:
                continue
            med = " | ".join(f"{sel[x]['median_labels']:,.0f}" if x in sel else "-" for x in RATIOS)
            out.append(f"| `{rule}` | {d:.0%} | {100 * sel[0.5]['rollback_rate']:.1f} % | "
                       f"{100 * sel[2.0]['promote_rate']:.1f} % | {med} |")
    return out


def ratios_line(rows: list[dict]) -> str:
    """Median labels at 0.5x of ours_disagreements / fixed_threshold per d, no delay."""
    def med(rule, d):
        return next(r["median_labels"] for r in rows if r["rule"] == rule and r["delay"] == "none"
                    and r["disagreement_rate"] == d and r["true_nfr_ratio"] == 0.5)
    parts = [f"d {d:.0%}: {med('ours_disagreements', d) / med('fixed_threshold', d):.2f}x" for d in DIS_RATES]
    return "ours_disagreements / fixed_threshold, median labels at 0.5x, no delay: " + ", ".join(parts)


def _pct(x: float, bold_above: float = 2.0) -> str:
    return f"**{100 * x:.1f} %**" if x > bold_above else f"{100 * x:.1f} %"


def all_checks_tables(rows: list[dict]) -> list[str]:
    """Markdown: ours_all_checks for a good candidate (with legacy_per_step on the same
    draws), then for bad ones (one regression or all three)."""
    def key(r):
        return (r["nfr_test"], r["disagreement_rate"] or 0, r["delay"], r["true_nfr_ratio"], r["true_error_ratio"],
                r["true_latency_ratio"])
    legacy = {key(r): r for r in rows if r["rule"] == "legacy_per_step"}
    ours = [r for r in rows if r["rule"] == "ours_all_checks"]
    good = [r for r in ours if "false_rollback_any" in r]
    out = ["ours_all_checks, a good candidate (NFR, errors, slow share at 0.5x), whole rollouts "
           "(shadow + 3 steps); **bold**: above the 5 % target:", "",
           "| nfr_test | d | delay | false rollback, any test | by NFR | by errors | by latency | promoted "
           "| undecided | median labels | median ticks to promote | legacy_per_step: false rollback | legacy by errors |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(good, key=lambda r: (DELAYS.index(r["delay"]), r["nfr_test"] != "labelled", key(r))):
        lg = legacy[key(r)]
        d = "-" if r["disagreement_rate"] is None else f"{r['disagreement_rate']:.0%}"
        out.append(f"| {r['nfr_test']} | {d} | {r['delay']} | {_pct(r['false_rollback_any'], TARGET)} | "
                   f"{_pct(r['rollback_by_nfr'])} | {_pct(r['rollback_by_errors'])} | {_pct(r['rollback_by_latency'])} | "
                   f"{_pct(r['promote_rate'])} | {_pct(r['undecided_rate'])} | {r['median_labels']:,.0f} | "
                   f"{r['median_ticks_to_promote'] or 0:.0f} | {_pct(lg['rollback_rate'], TARGET)} | "
                   f"{_pct(lg['rollback_by_errors'])} |")
    out += ["", "ours_all_checks, bad candidates (2x: NFR, error rate, slow share):", "",
            "| regression | nfr_test | d | delay | rollback | by NFR | by errors | by latency | promoted | undecided |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted((r for r in ours if "false_rollback_any" not in r),
                    key=lambda r: (DELAYS.index(r["delay"]), (ONE_BAD + ALL_CHECK_CASES).index(key(r)[3:]),
                                   r["nfr_test"] != "labelled", key(r))):
        what = "+".join(n for n, x in (("NFR", r["true_nfr_ratio"]), ("errors", r["true_error_ratio"]),
                                       ("latency", r["true_latency_ratio"])) if x >= 1)
        d = "-" if r["disagreement_rate"] is None else f"{r['disagreement_rate']:.0%}"
        out.append(f"| {what} | {r['nfr_test']} | {d} | {r['delay']} | {_pct(r['rollback_rate'])} | "
                   f"{_pct(r['rollback_by_nfr'])} | {_pct(r['rollback_by_errors'])} | {_pct(r['rollback_by_latency'])} | "
                   f"{_pct(r['promote_rate'])} | {_pct(r['undecided_rate'])} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=1000, help="rollouts per row")
    ap.add_argument("--check", type=int, default=20,
                    help="rollouts per ours_disagreements row also run through decide() (must agree exactly)")
    ap.add_argument("--check-all", type=int, default=5,
                    help="rollouts per ours_all_checks row also run through decide(), step by step (must agree)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "rollout_sim.json")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = ap.parse_args()
    rows, meta = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    lines = []
    for delay in DELAYS:
        lines += table(rows, delay) + [""]
    lines += all_checks_tables(rows) + [""]
    if meta["tuned_fixed_interval"]:
        lines.append(ratios_line(rows))
    lines.append(f"fixed_threshold = fixed_n{meta['tuned_fixed_interval']}; kayenta_mw (N per arm, confidence) = "
                 f"{meta['tuned_kayenta']}; {meta['seconds']} s; wrote {args.out}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
