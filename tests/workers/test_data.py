"""Datasets: deterministic splits, caching, growing generations, user npz validation."""

from __future__ import annotations

import numpy as np
import pytest

from workers.data import DataError, fingerprint, generation_train_split, load_dataset
from workers.specs import DataSpec


def test_digits_splits_are_disjoint_and_deterministic():
    spec = DataSpec(source="digits", seed=3, test_fraction=0.2, val_fraction=0.1)
    a, b = load_dataset(spec), load_dataset(spec)
    assert fingerprint(a.train) == fingerprint(b.train)
    n = len(a.train) + len(a.val) + len(a.test)
    assert n == 1797 and len(a.test) == round(1797 * 0.2) and a.num_classes == 10
    assert a.input_dim == 64
    rows = {r.tobytes() for r in a.train.x} & {r.tobytes() for r in a.test.x}
    assert not rows
    assert len(a.query) + len(a.gallery) == len(a.test)
    c = load_dataset(DataSpec(source="digits", seed=4))
    assert fingerprint(c.train) != fingerprint(a.train)


def test_mnist1d_is_generated_once_and_cached(cache_dir):
    spec = DataSpec(source="mnist1d", num_samples=1000, seed=0)
    state = np.random.get_state()[1].copy()
    a = load_dataset(spec)
    assert (np.random.get_state()[1] == state).all(), "global numpy RNG must be left untouched"
    files = list(cache_dir.glob("mnist1d_n1000_s0.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = load_dataset(spec)
    assert files[0].stat().st_mtime_ns == mtime
    assert fingerprint(a.test) == fingerprint(b.test)
    assert a.input_dim == 40 and a.num_classes == 10 and a.train.x.dtype == np.float32


def test_generations_see_growing_prefixes():
    ds = load_dataset(DataSpec(source="digits"))
    small = generation_train_split(ds, 0.2)
    big = generation_train_split(ds, 0.6)
    assert len(small) < len(big)
    assert np.array_equal(big.x[: len(small)], small.x)


def test_label_noise_changes_that_share_of_labels():
    """With noise 0.5, half the labels are redrawn uniformly over 10 classes, 1/10 of those
    land on the true class again -> about 45% change."""
    ds = load_dataset(DataSpec(source="digits"))
    clean = generation_train_split(ds, 1.0)
    noisy = generation_train_split(ds, 1.0, label_noise=0.5, seed=1)
    changed = np.mean(clean.y != noisy.y)
    assert 0.38 < changed < 0.52
    assert np.array_equal(noisy.y, generation_train_split(ds, 1.0, label_noise=0.5, seed=1).y)


def test_user_npz(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "mine.npz"
    np.savez(p, x=rng.normal(size=(100, 7)), y=rng.integers(0, 3, 100))
    ds = load_dataset(DataSpec(source="npz", path=p))
    assert ds.input_dim == 7 and ds.num_classes == 3


@pytest.mark.parametrize("arrays,match", [
    ({"x": np.zeros((5, 2))}, "needs arrays 'x' and 'y'"),
    ({"x": np.zeros((5, 2)), "y": np.zeros(4, int)}, "one label per row"),
    ({"x": np.zeros(5), "y": np.zeros(5, int)}, "x must be"),
    ({"x": np.full((5, 2), np.nan), "y": np.zeros(5, int)}, "NaN"),
    ({"x": np.zeros((5, 2)), "y": np.full(5, 0.5)}, "integer class ids"),
])
def test_bad_npz_is_a_clear_error(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=match):
        load_dataset(DataSpec(source="npz", path=p))


def test_npz_that_is_not_npz(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_text("hello")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset(DataSpec(source="npz", path=p))
