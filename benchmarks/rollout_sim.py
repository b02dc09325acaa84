"""Simulated rollouts: our sequential rule against fixed-threshold canary analyses.

Model. A candidate has a true live NFR p = ratio * nfr_limit (limit 1 %, as in
config/demo.yaml; ratio 0.5, 1, 2, 4). Labels arrive in ticks of TICK_LABELS = 50
labelled samples (each a negative flip with chance p, independently); every rule looks
at the counts after every tick and stops at its first promote or rollback. A rollout
still undecided after MAX_LABELS = 20,000 labels counts as neither and its labels count
as MAX_LABELS in the median. 1000 rollouts per (rule, ratio), seeded.

Rules.
- `ours`: orchestrator.rollout.decision's NFR test with the default policy (false_rollback_rate
  = false_promote_rate = 0.05), no minimum counts or bake (one gate, the statistics
  alone), no shadow comparisons: SPRT of 0.5x vs 2x the limit, rollback at
  LLR >= log(1/0.05), promote at LLR <= log(0.05 * 0.8) (the disagreement test keeps 20 %
  of the false-promote budget). Computed vectorised with decision.sprt_llr /
  sprt_bounds, and again rollout by rollout through `decide` itself (all of them by
  default, --check; the script fails if a single decision or label count differs).
- `ours_disagree`: the same plus shadow comparisons: 500 compared samples a tick whose
  disagreement rate equals the NFR (the worst case for the upper bound: every
  disagreement a negative flip), so the disagreement test can promote before enough
  labels. Vectorised and checked through `decide` likewise.
- `ours_demo_steps`: through `decide` with config/demo.yaml's rollout (shadow bake 5 s,
  three steps of 3 s bake, 100 requests and 100 labels each; one tick = 1 s, 50
  requests and 50 labels a tick): the cost of bake times and per-step minimum counts.
- `fixed_n<N>`: what Argo Rollouts / Flagger analyses do with a threshold metric: every
  N labels make one interval; an interval succeeds when its NFR (flips in the interval /
  N) is <= the limit and fails otherwise; 3 successes in a row promote, 3 failures in a
  row roll back (a success resets the failure run and vice versa). N is swept;
  `fixed_threshold` repeats the rows of the smallest N whose rollback rate at 0.5x and
  promote rate at 2x are both <= 5 %.

Run: .venv/bin/python -m benchmarks.rollout_sim   (about 10 s on 2 cores)
Writes benchmarks/results/rollout_sim.json (and .png: the operating characteristic of
`ours` and `fixed_threshold` on a finer grid of true NFRs) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from orchestrator.config import RolloutSpec, RolloutStep
from orchestrator.rollout.decision import (Counts, Observation, decide, design_rates, sprt_bounds,
                                   sprt_llr)

# benchmarks.common imports torch for the training benchmarks; this one needs only a path.
RESULTS = Path(__file__).resolve().parent / "results"

LIMIT = 0.01
RATIOS = (0.5, 1.0, 2.0, 4.0)
TICK_LABELS = 50
TICK_COMPARED = 500
MAX_LABELS = 20_000
TICKS = MAX_LABELS // TICK_LABELS
INTERVALS = (100, 200, 300, 400, 500, 600, 800, 1000, 1500, 2000)
RUN = 3
TARGET = 0.05


def _rng(seed: int, rule: str, ratio: float) -> np.random.Generator:
    """One stream per (rule family, ratio): `ours` and its `decide` check share it."""
    return np.random.default_rng([seed, sum(map(ord, rule)), int(ratio * 100)])


def _summary(rule: str, ratio: float, kind: np.ndarray, labels: np.ndarray, **extra) -> dict:
    """kind: +1 rollback, -1 promote, 0 undecided; labels at the decision (cap if none)."""
    return {"rule": rule, "true_nfr_ratio": ratio,
            "rollback_rate": float(np.mean(kind == 1)), "promote_rate": float(np.mean(kind == -1)),
            "median_labels": float(np.median(labels)), "undecided_rate": float(np.mean(kind == 0)),
            "rollouts": int(kind.size), **extra}


def _first_crossing(rollback: np.ndarray, promote: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kind, tick index) of the first tick with a decision per row (rollback wins a tie,
    as in decide); tick index TICKS when none."""
    any_ = rollback | promote
    first = np.where(any_.any(axis=1), any_.argmax(axis=1), rollback.shape[1])
    rows = np.arange(rollback.shape[0])
    at = np.minimum(first, rollback.shape[1] - 1)
    kind = np.where(first == rollback.shape[1], 0, np.where(rollback[rows, at], 1, -1))
    return kind, first


def draw(rng: np.random.Generator, n: int, ratio: float, disagree: bool):
    """Per-tick flips (n, TICKS) and disagreements (n, TICKS) or None."""
    p = ratio * LIMIT
    flips = rng.binomial(TICK_LABELS, p, size=(n, TICKS))
    dis = rng.binomial(TICK_COMPARED, p, size=(n, TICKS)) if disagree else None
    return flips, dis


def ours_vectorised(flips: np.ndarray, dis, policy: RolloutSpec) -> tuple[np.ndarray, np.ndarray]:
    """The SPRTs of decide() on cumulative counts, all rollouts and ticks at once."""
    p0, p1 = design_rates(policy.nfr_limit)
    lower, upper = sprt_bounds(policy.false_rollback_rate,
                               policy.false_promote_rate * (1 - policy.disagreement_share))
    n = TICK_LABELS * np.arange(1, TICKS + 1)
    llr = sprt_llr(np.cumsum(flips, axis=1), n, p0, p1)
    promote = llr <= lower
    if dis is not None:
        m = TICK_COMPARED * np.arange(1, TICKS + 1)
        llr_d = sprt_llr(np.cumsum(dis, axis=1), m, p0, p1)
        promote |= llr_d <= math.log(policy.false_promote_rate * policy.disagreement_share)
    kind, first = _first_crossing(llr >= upper, promote)
    return kind, np.minimum(first + 1, TICKS) * TICK_LABELS


def ours_through_decide(flips: np.ndarray, dis, policy: RolloutSpec, steps: bool,
                        tick_seconds: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Each rollout tick by tick through decide(), with a minimal controller: the shadow
    phase then policy.steps when `steps`, else one gate (policy.steps[0])."""
    kinds, labels = [], []
    for r in range(flips.shape[0]):
        total = np.zeros(4, dtype=np.int64)   # labelled, flips, compared, disagreements
        start = total.copy()
        stage, t0 = (-1 if steps else 0), 0.0
        kind, used = 0, MAX_LABELS
        for t in range(TICKS):
            d = dis[r, t] if dis is not None else 0
            total += (TICK_LABELS, flips[r, t], TICK_COMPARED if dis is not None else 0, d)

            def counts(c):
                return Counts(requests=int(c[0]), labelled=int(c[0]), negative_flips=int(c[1]),
                              compared=int(c[2]), disagreements=int(c[3]))
            now = (t + 1) * tick_seconds
            obs = Observation(total=counts(total), step=counts(total - start), step_elapsed_s=now - t0)
            dec = decide(obs, policy.steps[stage] if stage >= 0 else None, policy)
            if dec.kind == "rollback":
                kind, used = 1, int(total[0])
                break
            if dec.kind == "promote":
                if not steps or stage == len(policy.steps) - 1:
                    kind, used = -1, int(total[0])
                    break
                stage, t0, start = stage + 1, now, total.copy()
        kinds.append(kind)
        labels.append(used)
    return np.array(kinds), np.array(labels)


def fixed_rule(rng: np.random.Generator, n_rollouts: int, ratio: float, interval: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """The fixed-threshold analysis (module docstring), vectorised over rollouts."""
    k = MAX_LABELS // interval
    flips = rng.binomial(interval, ratio * LIMIT, size=(n_rollouts, k))
    ok = flips <= LIMIT * interval + 1e-9

    def run_reaches(x: np.ndarray) -> np.ndarray:
        run = np.zeros(n_rollouts, dtype=np.int64)
        hit = np.zeros_like(x)
        for j in range(k):
            run = np.where(x[:, j], run + 1, 0)
            hit[:, j] = run >= RUN
        return hit

    kind, first = _first_crossing(run_reaches(~ok), run_reaches(ok))
    return kind, np.where(kind == 0, MAX_LABELS, (first + 1) * interval)


def plot(path: Path, gate: RolloutSpec, interval: int, n: int, seed: int) -> None:
    """Operating characteristic on a fine grid of true NFRs: P(promote) and median labels
    of `ours` and the tuned fixed rule (vectorised paths only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.round(np.arange(0.25, 4.01, 0.25), 2)
    curves = {"ours (SPRT, Ville bounds)": [], f"fixed_threshold (N = {interval})": []}
    for ratio in grid:
        kind, labels = ours_vectorised(*draw(_rng(seed, "plot", ratio), n, ratio, False), gate)
        curves["ours (SPRT, Ville bounds)"].append((np.mean(kind == -1), np.median(labels)))
        kind, labels = fixed_rule(_rng(seed, "plotfixed", ratio), n, ratio, interval)
        curves[f"fixed_threshold (N = {interval})"].append((np.mean(kind == -1), np.median(labels)))
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, pts in curves.items():
        pts = np.array(pts)
        ax[0].plot(grid, 100 * pts[:, 0], marker="o", ms=3, label=name)
        ax[1].plot(grid, pts[:, 1], marker="o", ms=3, label=name)
    for x, y in ((0.5, 95), (2.0, 5)):
        ax[0].plot([x], [y], "k+", ms=12)
    ax[0].axvspan(0.5, 2.0, color="0.92")
    ax[0].set(xlabel="true NFR / limit", ylabel="promoted (%)",
              title="P(promote); + = targets, grey = indifference zone")
    ax[1].set(xlabel="true NFR / limit", ylabel="median labels to a decision", title="labels needed")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=1000)
    ap.add_argument("--check", type=int, default=1000,
                    help="rollouts per ratio also run through decide() (must agree exactly)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "rollout_sim.json")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--no-png", action="store_true", help="skip the operating-characteristic figure")
    args = ap.parse_args()
    t_start = time.perf_counter()

    gate = RolloutSpec(nfr_limit=LIMIT, shadow_bake_seconds=0,
                       steps=[RolloutStep(weight=1.0, bake_seconds=0, min_requests=0, min_labels=0)])
    demo = RolloutSpec(nfr_limit=LIMIT, shadow_bake_seconds=5, tick_seconds=1.0,
                       steps=[RolloutStep(weight=w, bake_seconds=3, min_requests=100, min_labels=100)
                              for w in (0.05, 0.25, 0.5)])
    rows: list[dict] = []
    for ratio in RATIOS:
        for rule, disagree in (("ours", False), ("ours_disagree", True)):
            flips, dis = draw(_rng(args.seed, rule, ratio), args.rollouts, ratio, disagree)
            kind, labels = ours_vectorised(flips, dis, gate)
            c = min(args.check, args.rollouts)
            k2, l2 = ours_through_decide(flips[:c], None if dis is None else dis[:c], gate, steps=False)
            if not (np.array_equal(k2, kind[:c]) and np.array_equal(l2, labels[:c])):
                raise SystemExit(f"{rule} at {ratio}x: vectorised rule and decide() disagree")
            rows.append(_summary(rule, ratio, kind, labels, checked_through_decide=c))
        flips, _ = draw(_rng(args.seed, "demo", ratio), args.rollouts, ratio, False)
        rows.append(_summary("ours_demo_steps", ratio, *ours_through_decide(flips, None, demo, steps=True)))

    fixed: dict[int, list[dict]] = {}
    for n in INTERVALS:
        fixed[n] = [_summary(f"fixed_n{n}", ratio,
                             *fixed_rule(_rng(args.seed, f"fixed{n}", ratio), args.rollouts, ratio, n),
                             interval_labels=n)
                    for ratio in RATIOS]
        rows += fixed[n]
    meets = [n for n in INTERVALS
             if all((r["true_nfr_ratio"] != 0.5 or r["rollback_rate"] <= TARGET)
                    and (r["true_nfr_ratio"] != 2.0 or r["promote_rate"] <= TARGET) for r in fixed[n])]
    if meets:
        rows += [dict(r, rule="fixed_threshold") for r in fixed[meets[0]]]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    if meets and not args.no_png:
        plot(args.out.with_suffix(".png"), gate, meets[0], args.rollouts, args.seed)
    if args.markdown:
        print("| rule | true NFR / limit | rollback | promote | undecided | median labels |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['rule']} | {r['true_nfr_ratio']:g}x | {100 * r['rollback_rate']:.1f} % "
                  f"| {100 * r['promote_rate']:.1f} % | {100 * r['undecided_rate']:.1f} % "
                  f"| {r['median_labels']:,.0f} |")
    else:
        print(f"{'rule':<18}{'NFR/limit':>10}{'rollback':>10}{'promote':>9}{'undecided':>10}{'median labels':>15}")
        for r in rows:
            print(f"{r['rule']:<18}{r['true_nfr_ratio']:>10g}{100 * r['rollback_rate']:>9.1f}%"
                  f"{100 * r['promote_rate']:>8.1f}%{100 * r['undecided_rate']:>9.1f}%{r['median_labels']:>15,.0f}")
    print(f"fixed_threshold = fixed_n{meets[0] if meets else '(none meets the targets)'}; "
          f"{time.perf_counter() - t_start:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
