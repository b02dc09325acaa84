"""The retrieval catalogue of a run: built once by the gallery generation, grown by production.

`ensure_catalogue` embeds the configured items (`retrieval.catalogue`) with the gallery
generation's verified checkpoint (Ray Data batch inference when Ray is connected) into
the persisted index at `retrieval.path` (`serving.catalogue` owns the format), unless a
catalogue is already there; `add_to_catalogue` embeds new items with the registry's
production and appends them, leaving every stored vector as it is. The router loads the
catalogue from its path (and reloads it when the manifest changes), never from its
deployment arguments. Both record an audit event in the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from orchestrator.config import RunConfig
from orchestrator.registry import Registry
import numpy as np

from serving.catalogue import CatalogueError, add_items, create_catalogue, load_catalogue, read_manifest
from serving.refs import ModelRef
from workers.embedding import Items, embed_items, load_items

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
