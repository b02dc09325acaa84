"""Data factories for the streaming tests (`data.source: ray`), referenced by import path
(`tests.fixtures_streaming:blobs`) as a user's package would be; Ray Data's tasks import
this module too.

Rows are a pure function of their id (no RNG state): class `id % classes`, x a fixed class
prototype plus noise hashed from the id, so every pass over the data sees the same rows.
"""

from __future__ import annotations

import numpy as np

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix_uniform(k: np.ndarray) -> np.ndarray:
    """splitmix64 of uint64 counters -> floats in [0, 1)."""
    with np.errstate(over="ignore"):
        z = (k.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & _M
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def rows(ids: np.ndarray, dim: int = 16, classes: int = 4, noise: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, dim) float32, y (N,) int64) of rows `ids`."""
    ids = np.asarray(ids, dtype=np.int64)
    y = ids % classes
    protos = np.random.default_rng(1234).standard_normal((classes, dim))
    k = ids[:, None].astype(np.uint64) * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None, :]
    x = protos[y] + noise * (2.0 * splitmix_uniform(k) - 1.0) * np.sqrt(3.0)
    return x.astype(np.float32), y


def _rows_batch(batch: dict, dim: int, classes: int) -> dict:
    x, y = rows(batch["id"], dim, classes)
    return {"x": x, "y": y}


def blobs(n: int = 3000, dim: int = 16, classes: int = 4, blocks: int = 8):
    """A lazy ray.data.Dataset of `n` rows (columns x, y), generated as it is read."""
    import ray.data

    return ray.data.range(n, override_num_blocks=blocks).map_batches(
        _rows_batch, fn_kwargs={"dim": dim, "classes": classes}, batch_format="numpy")


def blobs_splits(n: int = 3000, dim: int = 16, classes: int = 4):
    """The factory's own splits: a streamed train Dataset, test as a Dataset, val in memory."""
    import ray.data

    test = ray.data.range(400, override_num_blocks=2).map(lambda r: {"id": r["id"] + n}).map_batches(
        _rows_batch, fn_kwargs={"dim": dim, "classes": classes}, batch_format="numpy")
    return {"train": blobs(n, dim, classes), "val": rows(np.arange(n + 400, n + 600), dim, classes), "test": test}


def blobs_arrays(n: int = 3000, dim: int = 16, classes: int = 4):
    """The same rows as `blobs`, in memory (for `source: custom`)."""
    return rows(np.arange(n), dim, classes)
