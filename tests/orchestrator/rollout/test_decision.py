"""The rollout decision rule (orchestrator/rollout/decision.py): hand-computed cases and a small
seeded Monte-Carlo check of its two error bounds under checking at every tick.

Shared arithmetic (nfr_limit 0.01 -> p0 = 0.005, p1 = 0.02):
  flip increment      log(p1/p0)             = log 4           = +1.386294
  clean increment     log((1-p1)/(1-p0))     = log(0.98/0.995) = -0.0151902
  rollback boundary   log(1/(0.05 * 0.6))    (the NFR's budget share) = +3.506558
  promote boundary    log(0.05 * 0.8)        = log 0.04        = -3.218876
  disagreement promote log(0.05 * 0.2)       = log 0.01        = -4.605170
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dataclasses import replace

from orchestrator.config import RollbackBudget, RolloutSpec, RolloutStep
from orchestrator.rollout.decision import (Counts, Decision, Observation, conditional_llr, confidence_sequence,
                                           decide, design_rates, disagreement_test, latency_test, sprt_bounds,
                                           sprt_llr)

STEP = RolloutStep(weight=0.05, bake_seconds=10, min_requests=100, min_labels=100)
POLICY = RolloutSpec(steps=[STEP, RolloutStep(weight=0.5)], shadow_bake_seconds=30, nfr_limit=0.01,
                     error_rate_limit=0.01, latency_p99_ms=500.0)
CLEAN = math.log(0.98 / 0.995)


def obs(labelled=0, flips=0, requests=None, errors=0, compared=0, disagreements=0,
        latency=None, elapsed=100.0, step=None) -> Observation:
    """Total == step counts unless `step` is given (requests default to labelled)."""
    c = Counts(requests=labelled if requests is None else requests, errors=errors, compared=compared,
               disagreements=disagreements, labelled=labelled, negative_flips=flips,
               latency_p99_ms=latency)
    return Observation(total=c, step=step or c, step_elapsed_s=elapsed)


def test_llr_and_bounds_by_hand():
    """1 flip in 100: 1.386294 + 99 * (-0.0151902) = 1.386294 - 1.503830 = -0.117536."""
    assert sprt_llr(1, 100, 0.005, 0.02) == pytest.approx(-0.117536, abs=1e-5)
    assert sprt_bounds(0.05, 0.04) == pytest.approx((-3.218876, 2.995732), abs=1e-6)
    assert design_rates(0.01) == pytest.approx((0.005, 0.02))
    assert design_rates(0.6) == pytest.approx((0.3, 0.8))   # 2 * 0.6 capped at (1 + 0.6) / 2


def test_source_down_or_broken_counts_is_inconclusive_never_rollback():
    assert decide(None, STEP, POLICY).kind == "inconclusive"
    # A counter reset shows up as a negative delta; flips > labelled is impossible.
    bad = Observation(total=Counts(labelled=-5), step=Counts(), step_elapsed_s=50)
    assert decide(bad, STEP, POLICY).kind == "inconclusive"
    assert decide(obs(labelled=10, flips=11), STEP, POLICY).kind == "inconclusive"
    assert decide(obs(labelled=10, requests=5, errors=6), STEP, POLICY).kind == "inconclusive"


def test_promote_boundary_with_no_flips():
    """0 flips: promote once n * 0.0151902 >= 3.218876, i.e. n >= 211.9 -> 212 labels.
    211 * -0.0151902 = -3.20513 (hold), 212 * -0.0151902 = -3.22032 (promote)."""
    hold = decide(obs(labelled=211), STEP, POLICY)
    assert hold.kind == "hold"
    assert hold.stats["llr_nfr"] == pytest.approx(211 * CLEAN)
    d = decide(obs(labelled=212), STEP, POLICY)
    assert d.kind == "promote" and "NFR 0/212" in d.reason
    assert d.stats["llr_nfr"] == pytest.approx(-3.22032, abs=1e-4)


def test_rollback_boundary_needs_no_bake():
    """100 labels, 3 flips: 3 * 1.386294 - 97 * 0.0151902 = 4.158883 - 1.473449 = 2.685 (< 2.9957,
    hold); 4 flips: 5.545177 - 96 * 0.0151902 = 5.545177 - 1.458259 = 4.087 (rollback),
    even 1 s into the step: a regression shown is rolled back at once."""
    assert decide(obs(labelled=100, flips=3, elapsed=1), STEP, POLICY).kind == "hold"
    d = decide(obs(labelled=100, flips=4, elapsed=1), STEP, POLICY)
    assert d.kind == "rollback" and "NFR 4/100" in d.reason
    assert d.stats["llr_nfr"] == pytest.approx(4.0869, abs=1e-3)


def test_bake_and_step_minimums_hold_a_shown_promote():
    """300 clean labels (LLR 300 * -0.0151902 = -4.557, past -3.219) still wait for bake,
    min_requests and the step's own min_labels (totals from earlier steps do not count)."""
    assert decide(obs(labelled=300), STEP, POLICY).kind == "promote"
    assert "bake" in decide(obs(labelled=300, elapsed=9.9), STEP, POLICY).reason
    d = decide(obs(labelled=300, requests=99), STEP, POLICY)
    assert d.kind == "hold" and "requests 99/100" in d.reason
    total = Counts(requests=400, labelled=300)
    d = decide(Observation(total=total, step=Counts(requests=200, labelled=99), step_elapsed_s=50),
               STEP, POLICY)
    assert d.kind == "hold" and "labels 99/100" in d.reason


def test_shadow_phase_uses_shadow_bake_and_first_step_minimums():
    assert decide(obs(labelled=300, elapsed=29), None, POLICY).kind == "hold"
    assert decide(obs(labelled=300, elapsed=30), None, POLICY).kind == "promote"
    assert decide(obs(labelled=300, requests=99, elapsed=30), None, POLICY).kind == "hold"


def test_error_rate_rollback_needs_evidence():
    """SPRT of 2 * 0.01 vs 0.01 on the rollout's totals, rollback at LLR >= log(1/(0.05 *
    0.2)) = 4.605170 (the errors' share of the budget):
    7 errors / 100: 7 * log 2 + 93 * log(0.98/0.99) = 4.852030 - 0.944166 = 3.908 -> hold;
    9 errors / 100: 6.238325 - 91 * 0.0101523 = 6.238325 - 0.923860 = 5.314 -> rollback.
    One early error (1 of 1 request) is log 2 = 0.69: hold."""
    assert decide(obs(labelled=100, errors=7), STEP, POLICY).kind == "hold"
    d = decide(obs(labelled=100, errors=9), STEP, POLICY)
    assert d.kind == "rollback" and "error rate 9/100" in d.reason
    assert d.stats["llr_error"] == pytest.approx(5.3145, abs=1e-3)
    assert d.stats["llr_error_rollback_at"] == pytest.approx(4.605170, abs=1e-5)
    assert decide(obs(labelled=1, errors=1, elapsed=1), STEP, POLICY).kind == "hold"
    # totals, not the step: errors of an earlier step still count
    early = Observation(total=Counts(requests=100, errors=9, labelled=100), step=Counts(requests=10),
                        step_elapsed_s=100.0)
    assert decide(early, STEP, POLICY).kind == "rollback"


def test_error_limit_zero_rolls_back_at_min_errors():
    """With error_rate_limit 0 any error disproves the limit (LLR inf), so only min_errors
    (default 5) keeps four early failures from rolling back."""
    strict = POLICY.model_copy(update={"error_rate_limit": 0.0})
    assert decide(obs(labelled=100, errors=4), STEP, strict).kind == "hold"
    d = decide(obs(labelled=100, errors=5), STEP, strict)
    assert d.kind == "rollback"
    json.dumps(d.stats, allow_nan=False)   # inf is stored as 1e9: the audit log stays JSON


def lat_obs(slow, timed, base_slow=0, base_timed=0, labelled=300, latency=None) -> Observation:
    c = Counts(requests=labelled, labelled=labelled, timed=timed, slow=slow, base_timed=base_timed,
               base_slow=base_slow, latency_p99_ms=latency)
    return Observation(total=c, step=c, step_elapsed_s=100.0)


def test_latency_test_by_hand():
    """slow 8 of 200, no production counts, budget 0.01: allowed = 1 %, p0 0.005, p1 0.02:
    8 log 4 + 192 log(0.98/0.995) = 11.090355 - 2.916516 = 8.173839 >= log(1/0.008) =
    4.828314: rollback. 2 of 200: 2.772589 - 198 * 0.0151902 = -0.235 -> no."""
    t = latency_test(8, 200, 0, 0, 0.01)
    assert t["allowed"] == 0.01 and t["llr"] == pytest.approx(8.173839, abs=1e-5)
    assert t["rollback_at"] == pytest.approx(4.828314, abs=1e-5) and t["rollback"]
    assert not latency_test(2, 200, 0, 0, 0.01)["rollback"]
    # Production as slow as the candidate (10 %): allowed >= 10 %, no rollback.
    same = latency_test(200, 2000, 200, 2000, 0.01)
    assert same["allowed"] >= 0.1 and not same["rollback"]
    # Vectorised, as the benchmark calls it.
    v = latency_test(np.array([8, 2]), np.array([200, 200]), np.array([0, 0]), np.array([0, 0]), 0.01)
    assert list(v["rollback"]) == [True, False]


def test_latency_rollback_needs_min_requests_and_is_against_production():
    assert decide(lat_obs(8, 200), STEP, POLICY).kind == "rollback"
    assert decide(lat_obs(8, 99), STEP, POLICY).kind == "promote"       # under min_latency_requests
    assert decide(lat_obs(200, 2000, 200, 2000), STEP, POLICY).kind == "promote"   # as slow as production
    d = decide(lat_obs(8, 200, 0, 2000), STEP, POLICY)
    assert d.kind == "rollback" and "latency shown worse" in d.reason and "production 0/2000" in d.reason
    # The p99 gauge is shown, never tested; NaN (no data) is left out.
    assert decide(lat_obs(0, 0, latency=900.0), STEP, POLICY).kind == "promote"
    d = decide(lat_obs(0, 0, latency=float("nan")), STEP, POLICY)
    assert d.kind == "promote" and "latency_p99_ms" not in d.stats


def test_the_last_promotion_waits_until_errors_and_latency_are_shown_within_their_limits():
    """Out of the last step only: 0 errors in 200 requests is 200 log(0.98/0.99) = -2.03 >
    log 0.05 = -3.00: hold; in 300, -3.05: promote. 0 slow of 100 timed calls (allowed 1 %)
    is 100 log(0.98/0.995) = -1.52: hold; of 300, -4.56: promote. Earlier steps do not wait."""
    last = POLICY.steps[-1]
    held = decide(obs(labelled=300, requests=200), last, POLICY)
    assert held.kind == "hold" and "waiting before the last promotion: error rate 0/200" in held.reason
    assert decide(obs(labelled=300, requests=300), last, POLICY).kind == "promote"
    assert decide(obs(labelled=300, requests=200), STEP, POLICY).kind == "promote"
    assert decide(obs(labelled=300, requests=200), last, POLICY.model_copy(update={"error_rate_limit": 0.0})).kind \
        == "promote"                                           # no error rate is under a limit of 0
    slow = Counts(requests=400, labelled=300, timed=100)
    d = decide(Observation(total=slow, step=slow, step_elapsed_s=100.0), last, POLICY)
    assert d.kind == "hold" and "slow share 0/100" in d.reason
    assert d.stats["llr_latency_promote"] == pytest.approx(100 * CLEAN, abs=1e-6)
    fast = replace(slow, timed=300)
    assert decide(Observation(total=fast, step=fast, step_elapsed_s=100.0), last, POLICY).kind == "promote"


def test_a_slow_share_above_the_allowed_not_yet_shown_holds_and_never_promotes():
    """3 slow of 100 (3 % > 1 %): LLR 3 log 4 + 97 log(0.98/0.995) = 4.158883 - 1.473449
    = 2.685 < 4.828: not shown, so hold (300 clean labels would promote)."""
    d = decide(lat_obs(3, 100), STEP, POLICY)
    assert d.kind == "hold" and "latency not yet shown" in d.reason
    assert d.stats["llr_latency"] == pytest.approx(2.685434, abs=1e-4)


def test_disagreement_promotes_before_labels_but_never_rolls_back():
    """No labels; 0 disagreements in n compared: LLR = n * -0.0151902 <= log 0.01 = -4.60517
    needs n >= 303.2: 303 -> -4.6026 (hold), 304 -> -4.6178 (promote)."""
    assert decide(obs(requests=400, compared=303), STEP, POLICY).kind == "hold"
    d = decide(obs(requests=400, compared=304), STEP, POLICY)
    assert d.kind == "promote" and "disagreement 0/304" in d.reason
    # 10 % disagreement says nothing about flips: hold, not rollback.
    assert decide(obs(requests=2000, compared=2000, disagreements=200), STEP, POLICY).kind == "hold"
    # The disagreement route also waits for the step's minimum (compared stands in for labels).
    assert decide(obs(requests=400, compared=304, elapsed=5), STEP, POLICY).kind == "hold"


def test_monotonic_in_flips_and_clean_labels():
    """More flips at fixed n never move promote -> rollback back; more clean labels at fixed
    flips never move toward rollback (4 flips: rollback at 100 labels, promote from
    (n - 4) * 0.0151902 >= 5.545177 + 3.218876, n >= 581)."""
    order = {"promote": 0, "hold": 1, "rollback": 2}
    for n in (100, 300, 1000):
        kinds = [order[decide(obs(labelled=n, flips=k), STEP, POLICY).kind] for k in range(0, 30)]
        assert kinds == sorted(kinds) and kinds[0] <= 1 and kinds[-1] == 2
    kinds = [order[decide(obs(labelled=n, flips=4), STEP, POLICY).kind] for n in range(100, 3000, 50)]
    assert kinds == sorted(kinds, reverse=True) and kinds[0] == 2 and kinds[-1] == 0


def test_confidence_sequence_by_hand():
    """k=0, n=300, prior Beta(1, 99): log M(p) = log 99 - log 399 - 300 log(1-p) < log 20
    -> -300 log(1-p) < 2.995732 + 1.393766 = 4.389498 -> p < 1 - exp(-0.0146317) = 0.014525."""
    lo, hi = confidence_sequence(0, 300, 0.05, prior_mean=0.01)
    assert lo == 0.0 and hi == pytest.approx(0.014525, abs=1e-5)
    lo, hi = confidence_sequence(8, 300, 0.05, prior_mean=0.01)
    assert lo < 8 / 300 < hi and lo > 0.005   # 8/300 excludes the good rate 0.5 %


def _simulate(ratio: float, rollouts: int, tick: int, rng: np.random.Generator) -> np.ndarray:
    """Final kind per rollout, decide() called after every tick of `tick` labels."""
    gate = RolloutSpec(nfr_limit=0.01, shadow_bake_seconds=0,
                       steps=[RolloutStep(weight=1.0, bake_seconds=0, min_requests=0, min_labels=0)])
    out = []
    for _ in range(rollouts):
        flips = np.cumsum(rng.binomial(tick, ratio * 0.01, size=400))
        kind = "hold"
        for t in range(400):
            kind = decide(obs(labelled=tick * (t + 1), flips=int(flips[t])), gate.steps[0], gate).kind
            if kind != "hold":
                break
        out.append(kind)
    return np.array(out)


def test_monte_carlo_error_rates_hold_when_checked_every_tick():
    """300 seeded rollouts, checked every 10 labels (not the benchmark's 50: the Ville
    boundaries do not depend on the look schedule). Bounds: rollback <= 5 % at 0.5x,
    promote <= 4 % (the NFR share of 5 %) at 2x; the realised rates are about 2 %, so the
    binomial noise (sd ~0.8 %) cannot fail a correct rule. Power: 4x nearly always rolls back."""
    rng = np.random.default_rng(7)
    good = _simulate(0.5, 300, 10, rng)
    bad = _simulate(2.0, 300, 10, rng)
    assert np.mean(good == "rollback") <= 0.05 and np.mean(good == "promote") >= 0.9
    # bound 4 %; 3 sd of binomial noise on 300 rollouts is 3.4 points
    assert np.mean(bad == "promote") <= 0.074 and np.mean(bad == "rollback") >= 0.9
    assert np.mean(_simulate(4.0, 100, 10, rng) == "rollback") >= 0.99


def test_decision_is_a_frozen_dataclass_with_json_stats():
    d = decide(obs(labelled=150, flips=1, latency=12.0), STEP, POLICY)
    assert isinstance(d, Decision) and d.kind in ("promote", "hold", "rollback", "inconclusive")
    stats = json.loads(json.dumps(d.stats, allow_nan=False))
    for key in ("live_nfr", "nfr_lower", "nfr_upper", "disagreement", "error_rate", "llr_nfr",
                "latency_p99_ms"):
        assert key in stats
    with pytest.raises(Exception):
        d.kind = "promote"  # type: ignore[misc]


def test_benchmark_vectorised_rules_are_decide():
    """benchmarks/rollout_sim.py computes `ours` and `ours_disagreements` vectorised;
    replayed through decide() the same draws must give the same decision at the same label
    count, rollout by rollout, with and without label delays."""
    from benchmarks import rollout_sim as sim

    rng = np.random.default_rng(3)
    for ratio, delay in ((0.5, "none"), (2.0, "exponential")):
        counts = sim.labelled_counts(rng, 8, ratio, delay)
        kind, labels = sim.ours_labelled(counts, sim.gate_policy("labelled"))
        k2, l2 = sim.through_decide(counts, sim.gate_policy("labelled"), 8)
        assert np.array_equal(kind, k2) and np.array_equal(labels, l2)
    for ratio, d, delay in ((0.5, 0.05, "none"), (2.0, 0.1, "heavy_tailed"), (1.0, 0.02, "correlated")):
        counts = sim.disagreement_counts(rng, 8, ratio, d, delay)
        kind, labels = sim.ours_disagreements(counts, sim.gate_policy("disagreements"))
        k2, l2 = sim.through_decide(counts, sim.gate_policy("disagreements"), 8)
        assert np.array_equal(kind, k2) and np.array_equal(labels, l2)
        assert set(kind) <= {-1, 0, 1}


def test_mann_whitney_z_of_the_kayenta_peer_by_hand_and_against_scipy():
    from scipy.stats import mannwhitneyu

    from benchmarks.rollout_sim import mann_whitney_z

    assert mann_whitney_z(3, 1, 10) == pytest.approx(1.090, abs=1e-3)   # the docstring's arithmetic
    canary, baseline = np.r_[np.ones(30), np.zeros(170)], np.r_[np.ones(18), np.zeros(182)]
    p = mannwhitneyu(canary, baseline, alternative="greater", method="asymptotic", use_continuity=False).pvalue
    z = mann_whitney_z(30, 18, 200)
    assert 0.5 * math.erfc(z / math.sqrt(2)) == pytest.approx(p, rel=1e-9)


def test_the_rule_reads_its_minimums_and_budget_from_the_policy():
    """rollout.min_errors / min_latency_requests / rollback_budget are config keys: with
    min_errors 2 and limit 0, two errors already roll back (the default 5 holds); with
    min_latency_requests 201 the 8 slow of 200 are not tested; keyword arguments still win.
    The NFR's share sets its boundary: 4 flips / 100 (LLR 4.0869) roll back at the default
    0.6 (log(1/0.03) = 3.5066), not at 0.1 (log(1/0.005) = 5.2983)."""
    strict = POLICY.model_copy(update={"error_rate_limit": 0.0})
    assert decide(obs(labelled=100, errors=2), STEP, strict).kind == "hold"
    assert decide(obs(labelled=100, errors=2), STEP, strict.model_copy(update={"min_errors": 2})).kind == "rollback"
    assert decide(obs(labelled=100, errors=2), STEP, strict, min_errors=2).kind == "rollback"
    slow = lat_obs(8, 200)
    assert decide(slow, STEP, POLICY).kind == "rollback"
    assert decide(slow, STEP, POLICY.model_copy(update={"min_latency_requests": 201})).kind == "promote"
    assert decide(slow, STEP, POLICY, min_latency_requests=201).kind == "promote"
    four = obs(labelled=100, flips=4)   # 4 log 4 - 96 * 0.0151902 = 5.545177 - 1.458259 = 4.0869
    assert decide(four, STEP, POLICY).kind == "rollback"                # >= 3.5066
    tight = POLICY.model_copy(update={"rollback_budget": RollbackBudget(nfr=0.1, errors=0.45, latency=0.45)})
    assert decide(four, STEP, tight).kind == "hold"                     # < log(1/0.005) = 5.2983


# --- rollout.nfr_test: disagreements ---------------------------------------------------------

DIS = POLICY.model_copy(update={"nfr_test": "disagreements"})


def dis_obs(compared, disagreements, labelled_dis, flips, elapsed=100.0, requests=1000) -> Observation:
    c = Counts(requests=requests, compared=compared, disagreements=disagreements, labelled=labelled_dis,
               labelled_disagreements=labelled_dis, negative_flips=flips)
    return Observation(total=c, step=c, step_elapsed_s=elapsed)


def test_conditional_llr_by_hand_and_conservative_in_the_disagreement_rate():
    # d 0.05: q0 = 0.005/0.05 = 0.1, q1 = 0.02/0.05 = 0.4; 1 flip in 10:
    # log(0.4/0.1) + 9 log(0.6/0.9) = 1.386294 + 9 * (-0.405465) = 1.386294 - 3.649186 = -2.262892
    assert conditional_llr(1, 10, 0.05, 0.01) == pytest.approx(-2.262892, abs=1e-5)
    # A smaller d means a larger flip share under both hypotheses, so the same 3 flips in
    # 20 are less evidence against p0: the LLR grows with d.
    llrs = [conditional_llr(3, 20, d, 0.01) for d in (0.03, 0.05, 0.1, 0.2)]
    assert llrs == sorted(llrs) and llrs[0] < llrs[-1]
    # d at or below p0 = 0.005: no NFR above p0 is possible.
    assert conditional_llr(5, 5, 0.004, 0.01) == -math.inf


def test_disagreement_test_promotes_on_few_flips_and_rolls_back_on_many():
    # d about 0.05 from 2000 compared; 2 flips in 100 labelled disagreements (q about 0.02,
    # far under q0 = 0.1): promote. 12 in 30 (q 0.4 = q1): roll back.
    ok = disagreement_test(2000, 100, 100, 2, 0.01, 0.05, 0.05, 0.2)
    bad = disagreement_test(2000, 100, 30, 12, 0.01, 0.05, 0.05, 0.2)
    assert ok["promote"] and not ok["rollback"] and ok["d_lower"] < 0.05 < ok["d_upper"]
    assert bad["rollback"] and not bad["promote"]
    assert bad["llr_rollback"] <= bad["llr_promote"]  # each end on its conservative side
    # No labels: undecided, unless the disagreement rate alone is shown under p1 = 0.02.
    assert not disagreement_test(2000, 100, 0, 0, 0.01, 0.05, 0.05, 0.2)["promote"]
    assert disagreement_test(2000, 10, 0, 0, 0.01, 0.05, 0.05, 0.2)["promote"]


def test_decide_by_disagreements_needs_min_labelled_disagreements_and_rolls_back_any_time():
    # 100 compared per labelled disagreement is not needed: 2000 compared, 100 disagreements.
    assert decide(dis_obs(2000, 100, 100, 2), STEP, DIS).kind == "promote"
    held = decide(dis_obs(2000, 100, 60, 0), STEP, DIS)
    assert held.kind == "hold" and "labelled disagreements 60/100" in held.reason
    rb = decide(dis_obs(2000, 100, 30, 13, elapsed=0.0), STEP, DIS)   # no bake needed
    assert rb.kind == "rollback" and "13 flips in 30 labelled disagreements" in rb.reason
    assert {"d_lower", "d_upper", "llr_nfr_promote", "flip_share"} <= set(rb.stats)
    # live NFR = d * q = 100/2000 * 13/30 = 0.05 * 0.4333 = 0.021667, not flips / labelled
    assert rb.stats["live_nfr"] == pytest.approx(0.021667, abs=1e-6)
    assert rb.stats["flip_share"] == pytest.approx(13 / 30)
    assert rb.stats["nfr_lower"] <= 0.021667 <= rb.stats["nfr_upper"] <= rb.stats["d_upper"]
    # 12 in 30 was a rollback at the whole 5 % budget; at the NFR's 60 % share it holds
    assert decide(dis_obs(2000, 100, 30, 12, elapsed=0.0), STEP, DIS).kind == "hold"


def test_decide_by_disagreements_refuses_counts_without_labelled_disagreements():
    """A source that does not report labelled_disagreements (0) with flips cannot feed the
    test: inconclusive, never a decision."""
    c = Counts(requests=500, compared=2000, disagreements=100, labelled=100, negative_flips=3)
    d = decide(Observation(total=c, step=c, step_elapsed_s=100.0), STEP, DIS)
    assert d.kind == "inconclusive" and "labelled_disagreements" in d.reason


def test_disagreement_test_error_rates_hold_when_checked_every_tick():
    """400 seeded rollouts per case, d 0.05 and 0.2, 200 compared samples a tick with
    every disagreement labelled, checked each tick for 300 ticks: false rollback at 0.5x
    and bad promotion at 2x stay under 5 % (about 1-2 % realised, binomial sd ~1 %)."""
    rng = np.random.default_rng(11)
    for d in (0.05, 0.2):
        for ratio, wrong in ((0.5, "rollback"), (2.0, "promote")):
            q = ratio * 0.01 / d
            dis = rng.binomial(200, d, size=(400, 300)).cumsum(axis=1)
            flips = rng.binomial(np.diff(dis, axis=1, prepend=0), q).cumsum(axis=1)
            compared = 200 * np.arange(1, 301)
            res = disagreement_test(compared, dis, dis, flips, 0.01, 0.05, 0.05, 0.2)
            rb, pr = res["rollback"], res["promote"]
            first = np.where((rb | pr).any(axis=1), (rb | pr).argmax(axis=1), -1)
            kind = np.where(first < 0, "none", np.where(rb[np.arange(400), first], "rollback", "promote"))
            assert np.mean(kind == wrong) <= 0.05, (d, ratio, np.mean(kind == wrong))
            assert np.mean(kind != "none") >= 0.9, (d, ratio)


def test_benchmark_all_checks_rollouts_are_decide():
    """benchmarks/rollout_sim.py's `ours_all_checks` rows: whole rollouts (shadow phase and
    every step, the NFR, error-rate and latency tests all on) computed vectorised; replayed
    step by step through decide() the same draws must end the same way (promoted, rolled
    back by the same test, or undecided) at the same label count, every step promoted at
    the same tick."""
    from benchmarks import rollout_sim as sim

    rng = np.random.default_rng(5)
    seen = set()
    for nfr_test, d, ratios, delay in (("labelled", None, (0.5, 0.5, 0.5), "none"),
                                       ("labelled", None, (2.0, 2.0, 2.0), "exponential"),
                                       ("labelled", None, (0.5, 0.5, 2.0), "none"),
                                       ("disagreements", 0.05, (0.5, 0.5, 0.5), "heavy_tailed"),
                                       ("disagreements", 0.1, (0.5, 2.0, 0.5), "none")):
        policy = sim.all_checks_policy(nfr_test)
        counts = sim.all_checks_counts(rng, 4, nfr_test, ratios, d, delay)
        outcome, labels, promoted = sim.all_checks_rule(counts, policy)
        o2, l2, p2 = sim.all_checks_through_decide(counts, policy, 4)
        assert np.array_equal(outcome, o2) and np.array_equal(labels, l2) and np.array_equal(promoted, p2)
        assert set(outcome) <= set(sim.OUTCOMES)
        assert set(sim.all_checks_rule(counts, policy, legacy=True)[0]) <= set(sim.OUTCOMES)
        seen |= set(outcome)
    assert -1 in seen and seen & {1, 2, 3}    # both promotions and rollbacks were replayed
