"""The old-to-new embedding transformation on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from workers.transform import EmbeddingTransform, apply_transform, fit_transform


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_rotation_is_recovered_exactly_by_the_linear_start():
    """new = old @ R for an orthogonal R: the least-squares start is R itself, so even
    with no training step h maps held-out old vectors onto their new ones (cos ~ 1)."""
    rng = np.random.default_rng(0)
    r, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    old = _unit(rng.normal(size=(200, 8)))
    h = fit_transform(old, old @ r, steps=1)
    test = _unit(rng.normal(size=(20, 8)))
    got = apply_transform(h, test)
    assert np.allclose((got * (test @ r)).sum(1), 1.0, atol=1e-4)


def test_training_learns_a_non_linear_map_the_linear_part_cannot():
    """new = normalise(old ** 3) (cubed per coordinate, sign kept) in 4-d: training lowers
    the held-out cosine error well below the linear start's."""
    rng = np.random.default_rng(1)
    old = _unit(rng.normal(size=(2000, 4)))
    new = _unit(old ** 3)
    start = fit_transform(old[:1500], new[:1500], steps=1)
    trained = fit_transform(old[:1500], new[:1500], steps=800, hidden=64, lr=3e-3)
    err = lambda h: float(np.mean(1 - (apply_transform(h, old[1500:]) * new[1500:]).sum(1)))  # noqa: E731
    assert err(trained) < 0.5 * err(start), (err(trained), err(start))


def test_outputs_are_unit_vectors_of_the_new_size_and_batches_agree():
    h = EmbeddingTransform(6, 3, hidden=8)
    v = np.random.default_rng(2).normal(size=(10, 6)).astype(np.float32)
    out = apply_transform(h, v, batch_size=3)
    assert out.shape == (10, 3) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.allclose(out, apply_transform(h, v), atol=1e-6)


def test_bad_pairs_and_vectors_are_named():
    with pytest.raises(ValueError, match="same rows"):
        fit_transform(np.zeros((5, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        fit_transform(np.full((5, 4), np.nan), np.ones((5, 4)))
    with pytest.raises(ValueError, match="vectors of size 6"):
        apply_transform(EmbeddingTransform(6, 3), np.zeros((2, 5)))


def test_a_residual_that_only_fits_noise_is_dropped_for_the_linear_start():
    """new = old @ R plus per-pair noise that no function of old predicts, on 42 training
    pairs: a wide MLP trained 600 steps fits its pairs' noise and ends worse on the 18
    held-out pairs than the linear start (cos 0.38 against 0.45 on this draw), so the
    linear start (step 0) is what comes back."""
    rng = np.random.default_rng(5)
    r, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    old = _unit(rng.normal(size=(60, 8)))
    new = _unit(old @ r + 0.5 * rng.normal(size=(60, 8)))
    h = fit_transform(old, new, steps=600, hidden=256, lr=1e-2, weight_decay=0.0, holdout=0.3)
    rep = h.fit_report
    assert rep["held_out_pairs"] == 18
    assert rep["held_out_last"] < rep["held_out_linear"] - 0.02, rep
    assert rep["step"] == 0 and rep["held_out_best"] == rep["held_out_linear"]
    # the returned h is the linear start: its residual adds nothing
    assert np.allclose(apply_transform(h, old), _unit(old @ h.linear.weight.detach().numpy().T), atol=1e-5)


def test_a_learnable_non_linear_part_wins_over_the_linear_start_on_held_out_pairs():
    rng = np.random.default_rng(1)
    old = _unit(rng.normal(size=(2000, 4)))
    h = fit_transform(old, _unit(old ** 3), steps=800, hidden=64, lr=3e-3)
    rep = h.fit_report
    assert rep["step"] > 0 and rep["held_out_best"] > rep["held_out_linear"] + 0.01, rep


def test_with_labels_the_state_is_chosen_by_held_out_retrieval_top1():
    """Pairs of 4 classes whose new embeddings are the old ones rotated: the linear start is
    already exact, so held-out top-1 (new queries against h of old vectors) is 1.0 at step
    0, and that state is kept; labels of the wrong length are refused."""
    rng = np.random.default_rng(4)
    r, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    centres = _unit(rng.normal(size=(4, 8)))
    y = np.arange(400) % 4
    old = _unit(centres[y] + 0.1 * rng.normal(size=(400, 8)))
    h = fit_transform(old, old @ r, labels=y, steps=200)
    rep = h.fit_report
    assert rep["selected_by"] == "top1" and rep["held_out_linear"] == 1.0 and rep["step"] == 0
    with pytest.raises(ValueError, match="one class id per pair"):
        fit_transform(old, old @ r, labels=y[:10], steps=1)
