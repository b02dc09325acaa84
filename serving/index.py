"""The retrieval index: unit-length embeddings with their item ids in a faiss index, on disk.

One owner of the format. `build` makes an index of the configured kind over (vectors,
ids); `add` appends items later (embedded by whichever generation is in production, into
the same index: BCT keeps old and new vectors comparable); `search` answers cosine top-k
as (scores, item ids); `save` writes it atomically and returns its sha256, `load` checks
that sha256 before faiss parses a byte.

Kinds (`IndexSpec.type`), all by inner product on L2-normalised vectors (= cosine):
  flat   exact search (IndexFlatIP); memory 4 * dim bytes a vector; search scans all
  ivf    inverted lists over `nlist` k-means cells, `nprobe` cells searched (IndexIVFFlat)
  ivfpq  the same with product-quantised vectors, `pq_m` bytes a vector (IndexIVFPQ)
  hnsw   a navigable small-world graph, `hnsw_m` links a node, `ef_search` candidates
         a query (IndexHNSWFlat; no training; ids through an IndexIDMap2)
IVF kinds are trained on (a sample of) the first vectors they are built from; items
added later go to the trained cells.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import Field, model_validator

from workers.specs import StrictModel

INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw")


class RetrievalIndexError(ValueError):
    """A bad index file, a checksum mismatch, or vectors that do not fit the index."""


class IndexSpec(StrictModel):
    """Which faiss index holds the gallery (docs/serving.md, Retrieval)."""

    type: Literal["flat", "ivf", "ivfpq", "hnsw"] = "flat"
    nlist: Optional[int] = Field(None, ge=1, description="ivf, ivfpq: cells; default about 4 * sqrt(n)")
    nprobe: int = Field(16, ge=1, description="ivf, ivfpq: cells searched a query")
    pq_m: int = Field(16, ge=1, description="ivfpq: sub-quantisers (bytes a vector); must divide the dimension")
    pq_bits: int = Field(8, ge=4, le=12, description="ivfpq: bits a sub-quantiser code")
    hnsw_m: int = Field(32, ge=4, le=128, description="hnsw: links a node")
    ef_construction: int = Field(80, ge=8, description="hnsw: candidates while building")
    ef_search: int = Field(64, ge=1, description="hnsw: candidates a query")
    train_size: int = Field(100_000, ge=1000, description="ivf, ivfpq: vectors the k-means sees at most")

    @model_validator(mode="after")
    def _ivf_sizes(self) -> "IndexSpec":
        if self.nlist is not None and self.nprobe > self.nlist:
            raise ValueError(f"nprobe {self.nprobe} exceeds nlist {self.nlist}")
        return self


def _faiss():
    import faiss

    return faiss


def normalized(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (a zero row stays zero), as a new contiguous array."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32)).copy()
    if x.ndim != 2:
        raise RetrievalIndexError(f"vectors must be 2-D (n, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise RetrievalIndexError("vectors contain NaN or infinity")
    _faiss().normalize_L2(x)
    return x


def _ids(ids: np.ndarray, n: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.shape != (n,):
        raise RetrievalIndexError(f"{n} vectors need {n} ids, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise RetrievalIndexError(f"item ids must be integers, got dtype {ids.dtype}")
    if len(np.unique(ids)) != n:
        raise RetrievalIndexError("item ids repeat")
    return ids.astype(np.int64)


def default_nlist(n: int) -> int:
    """About 4 * sqrt(n) cells, at least 1 and at most n / 39 (faiss wants 39 points a cell).

    >>> default_nlist(1_000_000), default_nlist(10_000), default_nlist(100)
    (4000, 256, 2)
    """
    return max(1, min(int(4 * math.sqrt(n)) // 16 * 16 or 1, n // 39))


def build(spec: IndexSpec, vectors: np.ndarray, ids: np.ndarray, seed: int = 0):
    """A faiss index of `spec.type` over `vectors` (normalised here) keyed by `ids`."""
    faiss = _faiss()
    x = normalized(vectors)
    n, dim = x.shape
    item_ids = _ids(ids, n)
    if spec.type == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif spec.type == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = spec.ef_construction
        hnsw.hnsw.efSearch = spec.ef_search
        index = faiss.IndexIDMap2(hnsw)
    else:
        nlist = spec.nlist or default_nlist(n)
        if n < nlist:
            raise RetrievalIndexError(f"an {spec.type} index with nlist {nlist} needs at least {nlist} vectors to train, "
                              f"got {n}; lower nlist or use flat / hnsw")
        quantizer = faiss.IndexFlatIP(dim)
        if spec.type == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            if dim % spec.pq_m:
                raise RetrievalIndexError(f"ivfpq: pq_m {spec.pq_m} must divide the embedding size {dim}")
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, spec.pq_m, spec.pq_bits, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x if n <= spec.train_size else x[rng.choice(n, spec.train_size, replace=False)]
        index.train(sample)
        index.nprobe = min(spec.nprobe, nlist)  # (faiss' wrapper keeps the quantizer referenced)
    index.add_with_ids(x, item_ids)
    return index


def add(index, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Append items to `index`; an id already in it is refused (nothing is added)."""
    x = normalized(vectors)
    if x.shape[1] != index.d:
        raise RetrievalIndexError(f"the index holds vectors of size {index.d}, got {x.shape[1]}")
    item_ids = _ids(ids, len(x))
    present = set(item_ids_of(index).tolist())
    dup = [int(i) for i in item_ids if int(i) in present]
    if dup:
        raise RetrievalIndexError(f"item ids already in the index: {dup[:5]}{' ...' if len(dup) > 5 else ''}")
    index.add_with_ids(x, item_ids)


def item_ids_of(index) -> np.ndarray:
    """Every item id in `index` (int64)."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexIDMap2) or hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    out = []
    for c in range(ivf.nlist):
        size = ivf.invlists.list_size(c)
        if size:
            out.append(faiss.rev_swig_ptr(ivf.invlists.get_ids(c), size).copy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def vectors_of(index) -> np.ndarray:
    """Every stored vector, (ntotal, d) float32, in the order they were added (ivfpq:
    the quantised vectors, an approximation)."""
    faiss = _faiss()
    if hasattr(index, "id_map"):  # IndexIDMap2 over flat or hnsw: storage order = insertion order
        return index.index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)
    ivf = faiss.extract_index_ivf(index)
    ivf.make_direct_map()  # position ids (the catalogue's) -> stored vector
    ids = np.sort(item_ids_of(index))
    return np.stack([index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, index.d), np.float32)


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosine scores, item ids), each (n, k), best first; -1 ids pad when fewer than k items."""
    q = normalized(queries)
    if q.shape[1] != index.d:
        raise RetrievalIndexError(f"the index holds vectors of size {index.d}, queries have {q.shape[1]}")
    return index.search(q, int(k))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(index, path: str | Path) -> str:
    """Write `index` to `path` atomically; return the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _faiss().write_index(index, str(tmp))
    os.replace(tmp, path)
    return sha256_file(path)


def load(path: str | Path, sha256: Optional[str] = None):
    """The index at `path`, after checking its sha256 when one is given (faiss parses
    nothing that was changed since it was recorded)."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalIndexError(f"index not found: {path}")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise RetrievalIndexError(f"index {path} changed since it was recorded: sha256 {actual[:12]}..., "
                              f"expected {sha256[:12]}...")
    try:
        return _faiss().read_index(str(path))
    except RuntimeError as e:
        raise RetrievalIndexError(f"index {path} cannot be read: {e}") from None


def memory_bytes(index) -> int:
    """Bytes of the serialised index (what it holds in memory, give or take a few %)."""
    return int(_faiss().serialize_index(index).nbytes)


def set_search_params(index, spec: IndexSpec) -> None:
    """Apply `spec`'s query-time knobs (nprobe, ef_search) to a loaded index."""
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = spec.ef_search
    else:
        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:
            return
        ivf.nprobe = min(spec.nprobe, ivf.nlist)
