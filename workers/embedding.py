"""Catalogue items and their batch embedding with Ray Data.

`load_items` reads the items the catalogue config names (`ItemsSpec`: the data's gallery
split, an .npz, or a user's factory by import path) and checks them like training data.
`embed_items` embeds them with one generation's verified checkpoint: on a connected Ray
cluster, a Ray Data pipeline over the row numbers with `workers` actors (1 CPU each, one
torch thread), the inputs shipped once through the object store; without Ray, in this
process. Either way the result is in the items' order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from workers.data import DataError, check_arrays, load_dataset
from workers.specs import DataSpec, ItemsSpec


@dataclass(frozen=True)
class Items:
    """Catalogue items: ids (unicode), inputs (n, *input_shape) float32, labels or None."""

    ids: np.ndarray
    x: np.ndarray
    labels: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.ids)


def items_from_arrays(ids: Any, x: Any, y: Any = None, where: str = "items") -> Items:
    """Checked `Items`: x numbers without NaN, one id (and label) per row. DataError naming
    `where` and the problem (ids are checked by the catalogue when they are stored)."""
    ids_ = np.asarray(ids)
    if ids_.ndim != 1:
        raise DataError(f"{where}: ids must be a flat list, got shape {ids_.shape}")
    rows = len(x) if hasattr(x, "__len__") else -1
    if rows != len(ids_):
        raise DataError(f"{where}: {len(ids_)} ids for {rows} rows of x")
    split = check_arrays(x, np.zeros(len(ids_), np.int64) if y is None else y, where)
    return Items(ids_, split.x, None if y is None else split.y)


def load_items(spec: ItemsSpec, data: DataSpec) -> Items:
    """The catalogue's items as the config names them (DataError / FactoryError otherwise)."""
    if spec.source == "gallery_split":
        g = load_dataset(data).gallery
        return Items(np.array([str(i) for i in range(len(g))]), g.x, g.y)
    if spec.source == "npz":
        return load_items_file(Path(spec.path))
    from workers.factory import FactoryError, load_callable

    fn = load_callable(spec.factory or "", "retrieval.catalogue.factory")
    try:
        out = fn(**spec.kwargs)
    except Exception as e:
        raise FactoryError(f"retrieval.catalogue.factory {spec.factory}(**{spec.kwargs}) failed: "
                           f"{type(e).__name__}: {e}") from None
    where = f"retrieval.catalogue.factory {spec.factory}"
    if isinstance(out, dict) and {"ids", "x"} <= set(out):
        return items_from_arrays(out["ids"], out["x"], out.get("y"), where)
    if isinstance(out, (tuple, list)) and len(out) in (2, 3):
        return items_from_arrays(*out, where=where)
    raise DataError(f"{where}: must return {{'ids', 'x'[, 'y']}} or (ids, x[, y]), got {type(out).__name__}")


def load_items_file(path: Path) -> Items:
    """Items from an .npz with arrays `ids`, `x` and optionally `y` (no pickled objects)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "ids" not in f or "x" not in f:
                raise DataError(f"{path}: needs arrays 'ids' and 'x' (and optionally 'y'), found {sorted(f.files)}")
            return items_from_arrays(f["ids"], f["x"], f["y"] if "y" in f else None, str(path))
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz file of items ({e})") from None


class _Embedder:
    """Ray Data callable class: one verified model per actor, embeds the rows it is given."""

    def __init__(self, x: np.ndarray, uri: str, sha256: str, factory: Optional[str]):
        import torch

        from workers.checkpoint import load_model

        import ray

        torch.set_num_threads(1)  # one CPU per actor: no oversubscription, same numbers each run
        self.x = ray.get(x) if isinstance(x, ray.ObjectRef) else x  # the inputs, once per actor
        self.model, _ = load_model(uri, sha256, factory=factory)
        self.model.eval()

    def __call__(self, batch: dict) -> dict:
        from workers.training import predict

        rows = batch["data"]
        z, _ = predict(self.model, np.ascontiguousarray(self.x[rows], dtype=np.float32))
        return {"row": rows, "z": z.astype(np.float32)}


def backfill_order(vectors: np.ndarray, head: Any, how: str, seed: int = 0) -> np.ndarray:
    """Positions of stored `vectors` in the order a partial backfill re-embeds them:
    `uncertainty` (FastFill-style), the smallest margin between the top two logits of
    `head` (a `workers.losses.FrozenHead` of the model whose space the vectors are in) on
    the stored vector first, no raw item read; `random`, a seeded permutation.

    >>> from workers.losses import FrozenHead
    >>> head = FrozenHead("g0", np.eye(2, dtype=np.float32), np.zeros(2, np.float32), None)
    >>> backfill_order(np.array([[3, 0], [1, 0.9], [2, 1]], np.float32), head, "uncertainty").tolist()
    [1, 2, 0]
    """
    import torch

    if how == "random":
        return np.random.default_rng(seed).permutation(len(vectors))
    if how != "uncertainty":
        raise ValueError(f"backfill order: uncertainty or random, got {how!r}")
    with torch.no_grad():
        logits = head.logits(torch.as_tensor(np.asarray(vectors, np.float32))).numpy()
    top2 = np.sort(logits, axis=1)[:, -2:]
    return np.argsort(top2[:, 1] - top2[:, 0], kind="stable")


def embed_items(x: np.ndarray, uri: str, sha256: str, factory: Optional[str] = None, *, workers: int = 2,
                batch_size: int = 1024, log: Optional[Callable[[str], None]] = None) -> np.ndarray:
    """Embeddings (n, dim) of `x`, in order, by the checkpoint at `uri` (verified)."""
    t0 = time.perf_counter()
    n = len(x)
    try:
        import ray
        on_ray = ray.is_initialized()
    except ImportError:
        on_ray = False
    if not on_ray:
        from workers.checkpoint import load_model
        from workers.training import predict

        model, _ = load_model(uri, sha256, factory=factory)
        out = predict(model, np.ascontiguousarray(x, dtype=np.float32), batch_size)[0].astype(np.float32)
    else:
        from ray.data import ActorPoolStrategy

        # A fixed pool larger than the free CPUs would wait for actors that never start
        # (the serving plane and a training job may hold some): take what is free.
        free = int(ray.available_resources().get("CPU", 0))
        if free < workers:
            workers = max(1, free)
        # Row numbers as in-memory blocks (no read tasks: with every CPU held by the actor
        # pool, a read stage would never be scheduled), the inputs once in the object store.
        blocks = max(1, min(4 * workers, -(-n // batch_size)))
        ds = ray.data.from_numpy([np.asarray(b) for b in np.array_split(np.arange(n, dtype=np.int64), blocks)])
        emb = ds.map_batches(_Embedder, fn_constructor_args=(ray.put(np.ascontiguousarray(x)), uri, sha256, factory),
                             batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=workers),
                             num_cpus=1)
        out, seen = None, 0
        for batch in emb.iter_batches(batch_size=None, batch_format="numpy"):
            if out is None:
                out = np.empty((n, batch["z"].shape[1]), np.float32)
            out[batch["row"]] = batch["z"]
            seen += len(batch["row"])
        if out is None or seen != n:
            raise RuntimeError(f"catalogue embedding: {seen} of {n} rows came back")
    if log is not None:
        s = time.perf_counter() - t0
        log(f"embedded {n} items in {s:.1f}s ({n / max(s, 1e-9):.0f} items/s, "
            f"{f'{workers} Ray Data worker(s)' if on_ray else 'in process'})")
    return out
