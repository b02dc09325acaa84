"""Datasets and deterministic splits.

Three sources: MNIST-1D generated offline by `mnist1d` (cached on disk), scikit-learn's
digits (tiny, for fast tests) and a user's `.npz` with arrays `x` and `y`. Every split is
a pure function of the data and a seed, so each Ray worker rebuilds the same split.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.specs import DataSpec

# Query/gallery for retrieval are the two halves of the test split.


class DataError(ValueError):
    """A dataset that cannot be used (missing file, wrong arrays, NaN)."""


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (N, L) float32
    y: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def take(self, n: int) -> "Split":
        return Split(self.x[:n], self.y[:n])


@dataclass(frozen=True)
class Dataset:
    """Splits of one data source; `train` is the pool that generations see a prefix of."""

    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def input_dim(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def query(self) -> Split:
        half = len(self.test) // 2
        return Split(self.test.x[:half], self.test.y[:half])

    @property
    def gallery(self) -> Split:
        half = len(self.test) // 2
        return Split(self.test.x[half:], self.test.y[half:])


def cache_dir(spec: DataSpec) -> Path:
    if spec.cache_dir is not None:
        return Path(spec.cache_dir)
    return Path(os.environ.get("GRACEFUL_CACHE", Path.home() / ".cache" / "graceful"))


def _mnist1d(num_samples: int, seed: int, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    path = cache / f"mnist1d_n{num_samples}_s{seed}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return f["x"], f["y"]
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.train_split = 1.0  # we split ourselves
    # make_dataset reseeds numpy's global RNG; put it back so callers are not affected.
    state = np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    x, y = d["x"].astype(np.float32), d["y"].astype(np.int64)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)  # atomic: concurrent workers never read a half-written cache
    return x, y


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32) / 16.0
    return (x - x.mean()) / x.std(), d.target.astype(np.int64)


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise DataError(f"{path}: needs arrays 'x' and 'y', found {sorted(f.files)}")
            x, y = np.asarray(f["x"]), np.asarray(f["y"])
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{path}: x must be (N, L) and y (N,), got {x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise DataError(f"{path}: y must hold non-negative integer class ids")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: x contains NaN or inf")
    return x, y.astype(np.int64)


def load_dataset(spec: DataSpec) -> Dataset:
    """Build (or read from cache) the dataset and split it deterministically by `spec.seed`."""
    if spec.source == "mnist1d":
        x, y = _mnist1d(spec.num_samples, spec.seed, cache_dir(spec))
    elif spec.source == "digits":
        x, y = _digits()
    else:
        assert spec.path is not None
        x, y = _npz(Path(spec.path))
    n = len(y)
    order = np.random.default_rng(spec.seed).permutation(n)
    x, y = x[order], y[order]
    n_test = max(2, int(round(n * spec.test_fraction)))
    n_val = int(round(n * spec.val_fraction))
    if n - n_test - n_val < 2:
        raise DataError(f"{n} samples leave nothing to train on")
    test = Split(x[:n_test], y[:n_test])
    val = Split(x[n_test:n_test + n_val], y[n_test:n_test + n_val])
    train = Split(x[n_test + n_val:], y[n_test + n_val:])
    return Dataset(train=train, val=val, test=test, num_classes=int(y.max()) + 1)


def generation_train_split(ds: Dataset, train_fraction: float, label_noise: float = 0.0,
                           seed: int = 0) -> Split:
    """The prefix of the training pool a generation sees, optionally with noisy labels.

    A prefix, so that each later generation (larger fraction) sees a superset of the data
    of the ones before it. Label noise replaces that share of labels by random classes
    (deterministic by `seed`): the demo's way to build a regressing candidate.
    """
    n = max(1, int(round(len(ds.train) * train_fraction)))
    part = ds.train.take(n)
    if label_noise <= 0:
        return part
    rng = np.random.default_rng(10_000 + seed)
    y = part.y.copy()
    noisy = rng.random(n) < label_noise
    y[noisy] = rng.integers(0, ds.num_classes, noisy.sum())
    return Split(part.x, y)


def fingerprint(split: Split) -> str:
    """Short sha256 of a split's bytes (records which data a generation was trained on)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(split.x).tobytes())
    h.update(np.ascontiguousarray(split.y).tobytes())
    return h.hexdigest()[:16]
