"""The retrieval catalogue of a run: built once by the gallery generation, grown by production.

`ensure_catalogue` embeds the configured items (`retrieval.catalogue`) with the gallery
generation's verified checkpoint (Ray Data batch inference when Ray is connected) into
the persisted index at `retrieval.path` (`serving.catalogue` owns the format), unless a
catalogue is already there; `add_to_catalogue` embeds new items with the registry's
production and appends them, leaving every stored vector as it is. The router loads the
catalogue from its path (and reloads it when the manifest changes), never from its
deployment arguments. `transform_catalogue` maps stored vectors into a newer
generation's space without reading a raw item (FCT-style); `backfill_catalogue`
re-embeds a share of the items from their inputs, most uncertain first (FastFill-style).
Each records an audit event in the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from orchestrator.config import RunConfig
from orchestrator.registry import Registry
import time

import numpy as np

from serving.catalogue import (HOW, CatalogueError, add_items, create_catalogue, load_catalogue, read_manifest,
                               replace_vectors)
from serving.index import vectors_of
from serving.refs import ModelRef
from workers.embedding import Items, backfill_order, embed_items, load_items

Log = Optional[Callable[[str], None]]


def ensure_catalogue(cfg: RunConfig, reg: Registry, gallery: Callable[[], ModelRef], log: Log = None,
                     actor: str = "catalogue") -> Path:
    """The catalogue directory, built now if there is none, by the checkpoint `gallery()`
    returns (the gallery generation's, verified: `orchestrator.apps.generation_ref`). A
    catalogue whose items were first embedded by another generation than
    `gallery_generation` is refused (CatalogueError): its vectors are not the ones the
    config describes."""
    d = cfg.catalogue_dir
    m = read_manifest(d)
    if m is not None:
        if m["generations"][0] != cfg.gallery:
            raise CatalogueError(f"the catalogue at {d} was embedded by {m['generations'][0]}, the config's "
                                 f"gallery_generation is {cfg.gallery}; remove the directory to rebuild it")
        return d
    ref = gallery()
    items = load_items(cfg.retrieval.catalogue, cfg.data)
    if log is not None:
        log(f"catalogue: embedding {len(items)} items with {ref.name} (built once, never re-embedded)")
    z = embed_items(items.x, ref.uri, ref.sha256, ref.factory, workers=cfg.retrieval.embed_workers,
                    batch_size=cfg.retrieval.embed_batch_size, log=log)
    m = create_catalogue(d, cfg.retrieval.index, ref.name, z, items.ids, items.labels, seed=cfg.data.seed)
    reg.audit(actor, "catalogue_built", ref.name,
              reason=f"{m['count']} items, {cfg.retrieval.index.type} index, version {m['version']} at {d}")
    return d


def add_to_catalogue(cfg: RunConfig, reg: Registry, items: Items, production: ModelRef, log: Log = None,
                     actor: str = "catalogue") -> dict:
    """Embed `items` with `production` (the registry's, verified) and append them to the
    catalogue, which must exist (`ensure_catalogue`). Returns the new manifest."""
    d = cfg.catalogue_dir
    ref = production
    z = embed_items(items.x, ref.uri, ref.sha256, ref.factory, workers=cfg.retrieval.embed_workers,
                    batch_size=cfg.retrieval.embed_batch_size, log=log)
    m = add_items(d, ref.name, z, items.ids, items.labels)
    reg.audit(actor, "catalogue_items_added", ref.name,
              reason=f"{len(items)} items embedded by production {ref.name}; {m['count']} in all, version "
                     f"{m['version']}")
    return m


def catalogue_top1(path: Path, queries: np.ndarray, labels: np.ndarray) -> float:
    """Retrieval top-1 through the catalogue's own index: the share of queries whose
    nearest item has the query's label. CatalogueError when the items have no labels."""
    cat = load_catalogue(path)
    if (cat.labels < 0).any():
        raise CatalogueError(f"the catalogue at {path} has items without labels; top-1 cannot be scored")
    _, _, got = cat.search(queries, 1)
    return float(np.mean(np.array([g[0] for g in got]) == np.asarray(labels)))


def _model(ref: ModelRef):
    from workers.checkpoint import load_model

    return load_model(ref.uri, ref.sha256, factory=ref.factory)[0]


def _pool(cfg: RunConfig):
    """Rows the team holds for fitting a transformation: the training pool (the validation
    split for a streamed `data.source: ray`), the first `retrieval.transform.max_pairs`."""
    from workers.data import load_dataset

    ds = load_dataset(cfg.data)
    split = ds.train if len(ds.train) else ds.val
    if len(split) < 20:
        raise CatalogueError(f"the data has {len(split)} training rows; a transformation needs at least 20 pairs")
    return split.take(cfg.retrieval.transform.max_pairs)


def transform_catalogue(cfg: RunConfig, reg: Registry, target: ModelRef, refs: Callable[[str], ModelRef],
                        log: Log = None, actor: str = "catalogue") -> dict:
    """Map every stored vector not in `target`'s space into it: for each generation g whose
    space items are in, h_g is fitted on pairs (g's, target's embeddings of the training
    pool; `retrieval.transform`) and applied to those items' stored vectors. No raw item is
    read. `refs(name)` gives a generation's verified checkpoint. Returns the new manifest;
    its history records each fit and the seconds per million vectors."""
    from workers.transform import apply_transform, fit_transform

    d = cfg.catalogue_dir
    cat = load_catalogue(d)
    spec = cfg.retrieval.transform
    sources = [(i, g) for i, g in enumerate(cat.generations) if g != target.name and (cat.generation == i).any()]
    if not sources:
        raise CatalogueError(f"every vector of the catalogue at {d} is in {target.name}'s space already")
    pool = _pool(cfg)
    new = embed_items(pool.x, target.uri, target.sha256, target.factory, workers=cfg.retrieval.embed_workers,
                      batch_size=cfg.retrieval.embed_batch_size, log=log)
    stored = vectors_of(cat.index)
    rows, vecs, fits, apply_s = [], [], [], 0.0
    for i, g in sources:
        ref = refs(g)
        old = embed_items(pool.x, ref.uri, ref.sha256, ref.factory, workers=cfg.retrieval.embed_workers,
                          batch_size=cfg.retrieval.embed_batch_size, log=log)
        h = fit_transform(old, new, labels=pool.y, hidden=spec.hidden, depth=spec.depth, steps=spec.steps,
                          holdout=spec.holdout, seed=cfg.data.seed, log=log)
        mine = np.flatnonzero(cat.generation == i)
        t0 = time.perf_counter()
        vecs.append(apply_transform(h, stored[mine]))
        apply_s += time.perf_counter() - t0
        rows.append(mine)
        fits.append({"from": g, "items": int(len(mine)), **h.fit_report})
        if log is not None:
            rep = h.fit_report
            log(f"catalogue: {len(mine)} vectors of {g} -> {target.name} (held-out {rep['selected_by']} "
                f"{rep['held_out_best']:.4f}; linear start {rep['held_out_linear']:.4f}; step {rep['step']})")
    n = int(sum(len(r) for r in rows))
    note = {"fits": fits, "pairs": len(pool), "apply_seconds": round(apply_s, 3),
            "seconds_per_million": round(apply_s * 1e6 / max(n, 1), 2)}
    m = replace_vectors(d, np.concatenate(rows), np.concatenate(vecs), target.name, "transformed", note,
                        expect_version=cat.version)
    reg.audit(actor, "catalogue_transformed", target.name,
              reason=f"{n} stored vectors of {', '.join(g for _, g in sources)} mapped into {target.name}'s space "
                     f"(no item re-embedded); version {m['version']}")
    return m


def backfill_catalogue(cfg: RunConfig, reg: Registry, target: ModelRef, share: float,
                       refs: Callable[[str], ModelRef], order: Optional[str] = None, log: Log = None,
                       actor: str = "catalogue") -> dict:
    """Re-embed up to `share` of the catalogue's items with `target` from their inputs (the
    items of `retrieval.catalogue`; items added from other files have no inputs here and
    are left as they are): those not embedded by `target` itself, in `order`
    (`retrieval.backfill_order` by default). Returns the new manifest."""
    if not 0 < share <= 1:
        raise CatalogueError(f"share: a fraction in (0, 1], got {share}")
    from workers.losses import frozen_head

    d = cfg.catalogue_dir
    cat = load_catalogue(d)
    items = load_items(cfg.retrieval.catalogue, cfg.data)
    where = {str(k): i for i, k in enumerate(items.ids.tolist())}
    tgt = cat.generations.index(target.name) if target.name in cat.generations else -1
    own = (cat.generation == tgt) & (cat.how != HOW.index("transformed"))
    todo = np.flatnonzero(~own & np.isin(cat.ids, items.ids.astype(str)))
    if not len(todo):
        raise CatalogueError(f"no item of the catalogue at {d} is left to re-embed with {target.name}")
    how = order or cfg.retrieval.backfill_order
    stored = vectors_of(cat.index)[todo]
    if how == "random":
        ranked = todo[backfill_order(stored, None, "random", cfg.data.seed)]
    else:  # by the margin of the head of the model whose space each vector is in; heads of
        # different models have incomparable margins, so their ranks (0..1) are interleaved
        rank = np.empty(len(todo))
        for i in np.unique(cat.generation[todo]):
            sel = np.flatnonzero(cat.generation[todo] == i)
            head = frozen_head(_model(refs(cat.generations[i])), cat.generations[i])
            rank[sel[backfill_order(stored[sel], head, "uncertainty")]] = np.arange(len(sel)) / len(sel)
        ranked = todo[np.argsort(rank, kind="stable")]
    k = min(len(ranked), int(round(share * len(cat))))
    chosen = ranked[:k]
    if log is not None:
        log(f"catalogue: re-embedding {k} of {len(cat)} items with {target.name} ({how} first)")
    rows_in = np.array([where[str(cat.ids[r])] for r in chosen])
    z = embed_items(items.x[rows_in], target.uri, target.sha256, target.factory,
                    workers=cfg.retrieval.embed_workers, batch_size=cfg.retrieval.embed_batch_size, log=log)
    m = replace_vectors(d, chosen, z, target.name, "reembedded", {"share": share, "order": how},
                        expect_version=cat.version)
    reg.audit(actor, "catalogue_backfilled", target.name,
              reason=f"{k} of {len(cat)} items re-embedded ({how} first); version {m['version']}")
    return m
