"""Datasets and deterministic splits.

Sources: MNIST-1D generated offline by `mnist1d` (cached on disk), scikit-learn's digits
(tiny, for fast tests), a user's `.npz` with arrays `x` and `y`, and a user's factory
(`source: custom`, by import path) returning `(x, y)` or the three splits. `x` has any
shape `(N, *input_shape)`; `y` holds class ids. Every split is a pure function of the
data and a seed, so each Ray worker rebuilds the same split (a factory is called on the
driver and on every worker, and must return the same arrays each time). `source: ray`
streams instead (`workers.streaming`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from workers.specs import DataSpec

if TYPE_CHECKING:
    from workers.specs import GenerationSpec

# Query/gallery for retrieval are the two halves of the test split.


class DataError(ValueError):
    """A dataset that cannot be used (missing file, wrong arrays, NaN)."""


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (N, *input_shape) float32
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
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.train.x.shape[1:])

    @property
    def input_dim(self) -> int:
        """Values per row (the product of `input_shape`)."""
        return int(np.prod(self.input_shape))

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


def _to_numpy(v: object, name: str) -> np.ndarray:
    """An array-like (numpy, a torch tensor, nested lists) as a numpy array, or DataError."""
    try:
        if hasattr(v, "detach") and hasattr(v, "cpu"):  # a torch tensor (bfloat16 has no numpy dtype)
            v = v.detach().cpu()
            v = (v.float() if v.is_floating_point() and v.dtype != v.double().dtype else v).numpy()
        return np.asarray(v)
    except Exception as e:
        raise DataError(f"{name}: not an array ({type(e).__name__}: {e})") from None


def check_arrays(x: object, y: object, where: str, num_classes: Optional[int] = None) -> Split:
    """`x` (N, *input_shape) numbers and `y` (N,) class ids as a float32/int64 `Split`.

    DataError naming `where`, the array and the problem: a dtype that is not numbers (x) or
    integers (y), mismatched lengths, no rows, NaN/Inf, negative labels, or labels outside
    [0, num_classes) when `num_classes` is given."""
    xa, ya = _to_numpy(x, f"{where}: x"), _to_numpy(y, f"{where}: y")
    if xa.dtype.kind not in "biuf":
        raise DataError(f"{where}: x must hold numbers, got dtype {xa.dtype}")
    if ya.dtype.kind not in "iu":
        raise DataError(f"{where}: y must hold integer class ids, got dtype {ya.dtype}")
    if xa.ndim < 2:
        raise DataError(f"{where}: x must be (N, *input_shape) with at least 2 dimensions, got shape {xa.shape}")
    if ya.ndim != 1 or len(ya) != len(xa):
        raise DataError(f"{where}: y must be (N,) with one label per row of x, got x {xa.shape} and y {ya.shape}")
    if len(ya) == 0:
        raise DataError(f"{where}: no rows")
    xf = xa.astype(np.float32, copy=False)
    if not np.isfinite(xf).all():
        bad = int(np.count_nonzero(~np.isfinite(xf).reshape(len(xf), -1).all(axis=1)))
        raise DataError(f"{where}: x contains NaN or Inf ({bad} of {len(xf)} rows)")
    if (ya < 0).any():
        raise DataError(f"{where}: y must hold class ids >= 0, found {int(ya.min())}")
    if num_classes is not None and int(ya.max()) >= num_classes:
        raise DataError(f"{where}: y holds class {int(ya.max())}, outside [0, {num_classes}) (data.num_classes)")
    return Split(np.ascontiguousarray(xf), ya.astype(np.int64, copy=False))


def _npz(path: Path) -> "tuple[np.ndarray, np.ndarray] | dict[str, Split]":
    """Arrays `x`, `y` (split by seed), or `x_train`, `y_train`, `x_test`, `y_test` and
    optionally `x_val`, `y_val` (used as they are)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files)
            if {"x_train", "y_train", "x_test", "y_test"} <= names:
                return {k: check_arrays(f[f"x_{k}"], f[f"y_{k}"], f"{path}: {k}")
                        for k in SPLITS if f"x_{k}" in names and f"y_{k}" in names}
            if "x" not in f or "y" not in f:
                raise DataError(f"{path}: needs arrays 'x' and 'y' (or x_train, y_train, x_test, y_test), "
                                f"found {sorted(f.files)}")
            x, y = np.asarray(f["x"]), np.asarray(f["y"])
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    s = check_arrays(x, y, str(path))
    return s.x, s.y


SPLITS = ("train", "val", "test")


def call_data_factory(spec: DataSpec) -> object:
    """What the `factory` of a custom or ray source returns (FactoryError if it fails)."""
    from workers.factory import FactoryError, load_callable

    fn = load_callable(spec.factory or "", "data.factory")
    try:
        return fn(**spec.kwargs)
    except Exception as e:
        raise FactoryError(f"data.factory {spec.factory}(**{spec.kwargs}) failed: {type(e).__name__}: {e}") from None


def _custom(spec: DataSpec) -> "tuple[np.ndarray, np.ndarray] | dict[str, Split]":
    """(x, y) to split by seed, or the factory's own splits checked one by one."""
    out = call_data_factory(spec)
    where = f"data.factory {spec.factory}"
    if isinstance(out, dict):
        unknown = sorted(set(out) - set(SPLITS))
        if unknown or "train" not in out or "test" not in out:
            raise DataError(f"{where}: a dict of splits needs keys 'train' and 'test' (and optionally 'val'), "
                            f"got {sorted(out)}")
        splits = {}
        for k, v in out.items():
            if not (isinstance(v, (tuple, list)) and len(v) == 2):
                raise DataError(f"{where}: split {k!r} must be a pair (x, y), got {type(v).__name__}")
            splits[k] = check_arrays(v[0], v[1], f"{where}: {k}")
        return splits
    if isinstance(out, (tuple, list)) and len(out) == 2:
        s = check_arrays(out[0], out[1], where)
        return s.x, s.y
    raise DataError(f"{where}: must return (x, y) or {{'train': (x, y), 'val': (x, y), 'test': (x, y)}}, "
                    f"got {type(out).__name__}")


def _arrays(spec: DataSpec) -> "tuple[np.ndarray, np.ndarray] | dict[str, Split]":
    if spec.source == "mnist1d":
        return _mnist1d(spec.num_samples, spec.seed, cache_dir(spec))
    if spec.source == "digits":
        return _digits()
    if spec.source == "npz":
        assert spec.path is not None
        return _npz(Path(spec.path))
    if spec.source == "custom":
        return _custom(spec)
    raise DataError(f"data source {spec.source!r} streams its training rows to the Ray Train workers "
                    f"(workers.streaming.train_stream); they are never loaded into memory (load_dataset gives "
                    f"its val and test splits, a train_data with source ray is streamed by `graceful train`)")


def _classes(spec: DataSpec, splits: dict[str, Split]) -> int:
    """`spec.num_classes`, checked against every split's labels; else max label + 1."""
    top = max(int(s.y.max()) for s in splits.values() if len(s))
    if spec.num_classes is not None:
        for k, s in splits.items():
            if len(s) and int(s.y.max()) >= spec.num_classes:
                raise DataError(f"data: the {k} split holds class {int(s.y.max())}, outside "
                                f"[0, {spec.num_classes}) (data.num_classes)")
        return spec.num_classes
    if top < 1:
        raise DataError("data: every label is 0; a classifier needs at least 2 classes")
    return top + 1


def load_dataset(spec: DataSpec) -> Dataset:
    """Build (or read from cache) the dataset and split it deterministically by `spec.seed`
    (a custom factory's own splits are used as they are). DataError naming the problem.

    `source: ray`: the val and test splits only, each capped at `spec.eval_rows` rows, and
    an empty train split (the training rows stream: `workers.streaming.load_eval_dataset`)."""
    if spec.source == "ray":
        from workers.streaming import load_eval_dataset

        return load_eval_dataset(spec)
    got = _arrays(spec)
    if isinstance(got, dict):
        shapes = {k: s.x.shape[1:] for k, s in got.items()}
        if len(set(shapes.values())) > 1:
            raise DataError(f"data ({spec.source}): the splits' rows differ in shape: {shapes}")
        empty = Split(got["train"].x[:0], got["train"].y[:0])
        train, val, test = got["train"], got.get("val", empty), got["test"]
    else:
        x, y = got
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
    classes = _classes(spec, {"train": train, "val": val, "test": test})
    return Dataset(train=train, val=val, test=test, num_classes=classes)


def load_pool(spec: DataSpec, input_shape: tuple[int, ...]) -> tuple[Split, int]:
    """A generation's own training data (`generations[].train_data`): every row of it (the
    'train' split of a factory's dict), checked to have rows of `input_shape`; and its
    number of classes (`num_classes`, or max label + 1)."""
    got = _arrays(spec)
    pool = got["train"] if isinstance(got, dict) else Split(*got)
    if tuple(pool.x.shape[1:]) != tuple(input_shape):
        raise DataError(f"train_data ({spec.source}): rows of shape {tuple(pool.x.shape[1:])}, the run's data has "
                        f"{tuple(input_shape)}; every generation must take the same input shape")
    classes = spec.num_classes if spec.num_classes is not None else int(pool.y.max()) + 1
    if int(pool.y.max()) >= classes:
        raise DataError(f"train_data: y holds class {int(pool.y.max())}, outside [0, {classes}) (num_classes)")
    return pool, classes


def generation_data(ds: Dataset, gen: "GenerationSpec") -> tuple[Split, int]:
    """What generation `gen` trains on and its number of classes.

    The run's training pool, or `gen.train_data` when set (new rows, possibly new
    classes: the generation then has max(run classes, its classes) outputs), with the
    generation's train_fraction and label noise applied (`generation_train_split`)."""
    if gen.train_data is None:
        pool, classes = ds.train, ds.num_classes
    else:
        pool, own = load_pool(gen.train_data, ds.input_shape)
        classes = max(ds.num_classes, own)
    split = generation_train_split(ds, gen.train_fraction, gen.label_noise, gen.train.seed,
                                   pool=pool, num_classes=classes)
    return split, classes


def generation_train_split(ds: Dataset, train_fraction: float, label_noise: float = 0.0,
                           seed: int = 0, pool: Optional[Split] = None,
                           num_classes: Optional[int] = None) -> Split:
    """The prefix of the training pool (`ds.train`, or `pool`) a generation sees,
    optionally with noisy labels (drawn from `num_classes`, default `ds.num_classes`).

    A prefix, so that each later generation (larger fraction) sees a superset of the data
    of the ones before it. Label noise replaces that share of labels by random classes
    (deterministic by `seed`): the demo's way to build a regressing candidate.
    """
    pool = ds.train if pool is None else pool
    n = max(1, int(round(len(pool) * train_fraction)))
    part = pool.take(n)
    if label_noise <= 0:
        return part
    rng = np.random.default_rng(10_000 + seed)
    y = part.y.copy()
    noisy = rng.random(n) < label_noise
    y[noisy] = rng.integers(0, num_classes or ds.num_classes, noisy.sum())
    return Split(part.x, y)


def fingerprint(split: Split) -> str:
    """Short sha256 of a split's bytes (records which data a generation was trained on)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(split.x).tobytes())
    h.update(np.ascontiguousarray(split.y).tobytes())
    return h.hexdigest()[:16]
