"""Flip and retrieval metrics on tiny hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.evaluation import metrics as m

# Six samples, three classes.
#   y   = 0 0 1 1 2 2
#   old = 0 1 1 1 2 0   old right on 0,2,3,4
#   new = 0 0 2 1 0 2   new right on 0,1,3,5
Y = np.array([0, 0, 1, 1, 2, 2])
OLD = np.array([0, 1, 1, 1, 2, 0])
NEW = np.array([0, 0, 2, 1, 0, 2])


def test_error_and_flips():
    """old errors {1,5} -> 2/6; new errors {2,4} -> 2/6.
    negative flips (old right, new wrong): samples 2 and 4 -> NFR 2/6.
    positive flips (old wrong, new right): samples 1 and 5 -> PFR 2/6.
    NFI = NFR / new error = (2/6)/(2/6) = 1. Disagreement: samples 1,2,4,5 -> 4/6."""
    assert m.error_rate(Y, OLD) == pytest.approx(2 / 6)
    assert m.error_rate(Y, NEW) == pytest.approx(2 / 6)
    assert m.nfr(Y, OLD, NEW) == pytest.approx(2 / 6)
    assert m.pfr(Y, OLD, NEW) == pytest.approx(2 / 6)
    assert m.nfi(Y, OLD, NEW) == pytest.approx(1.0)
    assert m.disagreement(OLD, NEW) == pytest.approx(4 / 6)
    assert m.negative_flips(Y, OLD, NEW).tolist() == [False, False, True, False, True, False]


def test_per_class_nfr_and_flip_matrix():
    """Class 0: samples 0,1 -> no negative flip -> 0. Class 1: samples 2,3 -> sample 2 flips -> 1/2.
    Class 2: samples 4,5 -> sample 4 flips -> 1/2. Flip matrix: sample 2 old 1 -> new 2;
    sample 4 old 2 -> new 0."""
    assert m.per_class_nfr(Y, OLD, NEW, 4).tolist() == [0.0, 0.5, 0.5, 0.0]
    fm = m.flip_matrix(Y, OLD, NEW, 3)
    assert fm[1, 2] == 1 and fm[2, 0] == 1 and fm.sum() == 2


def test_nfi_is_zero_when_new_is_perfect():
    assert m.nfi(Y, OLD, Y) == 0.0


def test_compare_collects_everything():
    r = m.compare(Y, OLD, NEW, 3, n_boot=200)
    assert r.nfr == pytest.approx(2 / 6) and r.error_change == pytest.approx(0.0)
    assert r.worst_class in (1, 2) and r.worst_class_nfr == pytest.approx(0.5)
    assert r.nfr_ci_low <= r.nfr <= r.nfr_ci_high


def test_bootstrap_ci_covers_and_narrows_with_n():
    """True NFR 0.1: 10 flips in 100 -> the 95% interval is about 0.1 +- 1.96*sqrt(.09/100) = [0.04, 0.16]."""
    y = np.zeros(100, int)
    old = np.zeros(100, int)
    new = np.zeros(100, int)
    new[:10] = 1
    lo, hi = m.bootstrap_nfr_ci(y, old, new, n_boot=4000, seed=1)
    assert 0.03 <= lo <= 0.06 and 0.14 <= hi <= 0.17
    big = np.tile(new, 100)
    lo2, hi2 = m.bootstrap_nfr_ci(np.tile(y, 100), np.tile(old, 100), big, n_boot=4000)
    assert hi2 - lo2 < (hi - lo) / 5


def test_length_mismatch_and_empty_are_errors():
    with pytest.raises(ValueError, match="differ in length"):
        m.nfr(Y, OLD, NEW[:3])
    with pytest.raises(ValueError, match="empty"):
        m.error_rate(np.array([]), np.array([]))


# --- retrieval ---------------------------------------------------------------------------

def _brute_force_top1(q, qy, g, gy):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    return float(np.mean(gy[np.argmax(qn @ gn.T, axis=1)] == qy))


def _brute_force_map(q, qy, g, gy):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    aps = []
    for i in range(len(q)):
        order = np.argsort(-(qn[i] @ gn.T), kind="stable")
        rel = gy[order] == qy[i]
        if rel.sum() == 0:
            continue
        precisions = [rel[: k + 1].mean() for k in range(len(rel)) if rel[k]]
        aps.append(np.mean(precisions))
    return float(np.mean(aps))


def test_top1_hand_case():
    """Gallery: (1,0) class 0, (0,1) class 1. Queries (2,0.1)->nearest (1,0)=0 right;
    (0.1,3)->(0,1)=1 right; (1,0.9) labelled 1 -> nearest (1,0)=0 wrong. Top-1 = 2/3."""
    g = np.array([[1, 0], [0, 1]], float)
    gy = np.array([0, 1])
    q = np.array([[2, 0.1], [0.1, 3], [1, 0.9]])
    qy = np.array([0, 1, 1])
    assert m.retrieval_top1(q, qy, g, gy) == pytest.approx(2 / 3)


def test_map_hand_case():
    """One query (1,0) of class 0 against gallery ranked (1,0)[0], (1,1)[1], (0,1)[0]:
    relevant at ranks 1 and 3 -> AP = (1/1 + 2/3)/2 = 5/6."""
    g = np.array([[1, 0], [0.7, 0.7], [0, 1]], float)
    gy = np.array([0, 1, 0])
    assert m.retrieval_map(np.array([[1.0, 0.0]]), np.array([0]), g, gy) == pytest.approx(5 / 6)


def test_faiss_matches_brute_force():
    rng = np.random.default_rng(0)
    g, q = rng.normal(size=(300, 16)), rng.normal(size=(120, 16))
    gy, qy = rng.integers(0, 5, 300), rng.integers(0, 5, 120)
    q[:60] = g[:60] + 0.05 * rng.normal(size=(60, 16))  # some near-duplicates
    qy[:60] = gy[:60]
    assert m.retrieval_top1(q, qy, g, gy) == pytest.approx(_brute_force_top1(q, qy, g, gy))
    assert m.retrieval_map(q, qy, g, gy) == pytest.approx(_brute_force_map(q, qy, g, gy), abs=1e-5)


def test_compatibility_matrix_and_bct_criterion():
    """Gen a and b embed identically (rotation-free copy) -> all cells equal; gen c is a
    random rotation of a -> cross cells collapse while its own cell stays high."""
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 8)) * 3
    qy, gy = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    qa = centers[qy] + rng.normal(size=(200, 8))
    ga = centers[gy] + rng.normal(size=(200, 8))
    rot, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    names, mat = m.compatibility_matrix({"a": qa, "b": qa, "c": qa @ rot}, qy,
                                        {"a": ga, "b": ga, "c": ga @ rot}, gy)
    assert names == ["a", "b", "c"]
    assert mat[0, 0] == mat[1, 0] == mat[0, 1] and mat[2, 2] == pytest.approx(mat[0, 0])
    assert mat[2, 0] < mat[0, 0] - 0.3
    assert m.bct_criterion(mat[1, 0] + 0.01, mat[0, 0]) and not m.bct_criterion(mat[2, 0], mat[0, 0])


def test_retrieval_rejects_bad_embeddings():
    with pytest.raises(ValueError, match="not comparable"):
        m.retrieval_top1(np.ones((2, 3)), np.zeros(2), np.ones((2, 4)), np.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        m.retrieval_top1(np.full((2, 3), np.nan), np.zeros(2), np.ones((2, 3)), np.zeros(2))
    _, mat = m.compatibility_matrix({"a": np.ones((2, 3)), "b": np.ones((2, 4))}, np.zeros(2),
                                    {"a": np.ones((2, 3)), "b": np.ones((2, 4))}, np.zeros(2))
    assert np.isnan(mat[0, 1]) and np.isnan(mat[1, 0]) and mat[0, 0] == 1.0
