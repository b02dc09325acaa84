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
  if one decision or label count differs).
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
Every row is 1000 rollouts (--rollouts), seeded; an undecided rollout counts the labels
that had arrived at the horizon.

Run: .venv/bin/python -m benchmarks.rollout_sim --markdown   (about a minute on 2 cores)
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
from orchestrator.rollout.decision import Counts, Observation, decide, design_rates, disagreement_test, sprt_bounds, sprt_llr

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
    """decide()'s statistics alone: one gate, no bake, no minimum counts."""
    return RolloutSpec(nfr_limit=LIMIT, shadow_bake_seconds=0, nfr_test=nfr_test,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=1000, help="rollouts per row")
    ap.add_argument("--check", type=int, default=20,
                    help="rollouts per ours_disagreements row also run through decide() (must agree exactly)")
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
    if meta["tuned_fixed_interval"]:
        lines.append(ratios_line(rows))
    lines.append(f"fixed_threshold = fixed_n{meta['tuned_fixed_interval']}; kayenta_mw (N per arm, confidence) = "
                 f"{meta['tuned_kayenta']}; {meta['seconds']} s; wrote {args.out}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
