"""Regression and compatibility metrics: pure functions, numpy in, numbers out.

Flip metrics follow positive-congruent training (Yan et al., CVPR 2021):
  NFR = share of samples where old is right and new is wrong (negative flips),
  PFR = share where old is wrong and new is right, NFI = NFR / error of the new model.
Retrieval follows BCT (Shen et al., CVPR 2020): M(query model, gallery model) is the
top-1 accuracy of query embeddings searched against gallery embeddings; a new model is
backward compatible when M(new, old) > M(old, old).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np


def _check(*arrays: np.ndarray) -> list[np.ndarray]:
    out = [np.asarray(a).reshape(-1) for a in arrays]
    n = len(out[0])
    if any(len(a) != n for a in out):
        raise ValueError(f"arrays differ in length: {[len(a) for a in out]}")
    if n == 0:
        raise ValueError("empty input")
    return out


def error_rate(y: np.ndarray, pred: np.ndarray) -> float:
    y, pred = _check(y, pred)
    return float(np.mean(y != pred))


def negative_flips(y: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Boolean mask: old right, new wrong."""
    y, old, new = _check(y, old, new)
    return (old == y) & (new != y)


def positive_flips(y: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Boolean mask: old wrong, new right."""
    y, old, new = _check(y, old, new)
    return (old != y) & (new == y)


def nfr(y: np.ndarray, old: np.ndarray, new: np.ndarray) -> float:
    return float(np.mean(negative_flips(y, old, new)))


def pfr(y: np.ndarray, old: np.ndarray, new: np.ndarray) -> float:
    return float(np.mean(positive_flips(y, old, new)))


def nfi(y: np.ndarray, old: np.ndarray, new: np.ndarray) -> float:
    """NFR / error of the new model; 0 when the new model makes no error (hence no flip)."""
    err = error_rate(y, new)
    return nfr(y, old, new) / err if err > 0 else 0.0


def disagreement(old: np.ndarray, new: np.ndarray) -> float:
    """Share of samples where the two predictions differ; needs no labels, bounds NFR above."""
    old, new = _check(old, new)
    return float(np.mean(old != new))


def per_class_nfr(y: np.ndarray, old: np.ndarray, new: np.ndarray, num_classes: int) -> np.ndarray:
    """For each true class c: negative flips among samples of class c / samples of class c.

    Classes with no sample get 0.
    """
    y, old, new = _check(y, old, new)
    flips = negative_flips(y, old, new)
    counts = np.bincount(y, minlength=num_classes).astype(float)
    flipped = np.bincount(y[flips], minlength=num_classes).astype(float)
    return np.divide(flipped, counts, out=np.zeros(num_classes), where=counts > 0)


def class_counts(y: np.ndarray, old: np.ndarray, new: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(samples, negative flips) per true class: the counts behind `per_class_nfr`."""
    y, old, new = _check(y, old, new)
    flips = negative_flips(y, old, new)
    return np.bincount(y, minlength=num_classes), np.bincount(y[flips], minlength=num_classes)


def flip_matrix(y: np.ndarray, old: np.ndarray, new: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of negative flips by (old predicted class, new predicted class)."""
    y, old, new = _check(y, old, new)
    flips = negative_flips(y, old, new)
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (old[flips], new[flips]), 1)
    return m


def bootstrap_nfr_ci(y: np.ndarray, old: np.ndarray, new: np.ndarray, n_boot: int = 1000,
                     level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the NFR (resampling samples)."""
    flips = negative_flips(y, old, new)
    n = len(flips)
    # Resampling n 0/1 flip indicators with replacement and averaging is exactly
    # Binomial(n, observed NFR) / n: same distribution, O(n_boot) memory instead of n*n_boot.
    rng = np.random.default_rng(seed)
    stats = rng.binomial(n, flips.mean(), size=n_boot) / n
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class FlipReport:
    """Offline comparison of a candidate against a baseline on one labelled set."""

    n: int
    error_old: float
    error_new: float
    error_change: float
    nfr: float
    pfr: float
    nfi: float
    disagreement: float
    nfr_ci_low: float
    nfr_ci_high: float
    worst_class: int
    worst_class_nfr: float

    def as_dict(self) -> dict:
        return asdict(self)


def compare(y: np.ndarray, old: np.ndarray, new: np.ndarray, num_classes: int,
            n_boot: int = 1000, seed: int = 0) -> FlipReport:
    """All flip metrics of `new` against `old` at once."""
    per_class = per_class_nfr(y, old, new, num_classes)
    lo, hi = bootstrap_nfr_ci(y, old, new, n_boot=n_boot, seed=seed)
    e_old, e_new = error_rate(y, old), error_rate(y, new)
    return FlipReport(
        n=len(np.asarray(y).reshape(-1)), error_old=e_old, error_new=e_new,
        error_change=e_new - e_old, nfr=nfr(y, old, new), pfr=pfr(y, old, new),
        nfi=nfi(y, old, new), disagreement=disagreement(old, new),
        nfr_ci_low=lo, nfr_ci_high=hi, worst_class=int(np.argmax(per_class)),
        worst_class_nfr=float(per_class.max()),
    )


# --- retrieval -------------------------------------------------------------------------

def _normalise(e: np.ndarray) -> np.ndarray:
    e = np.ascontiguousarray(e, dtype=np.float32)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be 2-d (N, D), got shape {e.shape}")
    if not np.isfinite(e).all():
        raise ValueError("embeddings contain NaN or inf")
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.maximum(norms, 1e-12)


def _ranking(query: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most cosine-similar gallery items per query, with faiss."""
    import faiss

    q, g = _normalise(query), _normalise(gallery)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}: models are not comparable")
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    _, idx = index.search(q, k)
    return idx


def retrieval_hits(query_emb: np.ndarray, query_y: np.ndarray,
                   gallery_emb: np.ndarray, gallery_y: np.ndarray) -> np.ndarray:
    """Boolean per query: its nearest gallery item (cosine) has the query's label."""
    idx = _ranking(query_emb, gallery_emb, 1)[:, 0]
    return np.asarray(gallery_y)[idx] == np.asarray(query_y)


def retrieval_top1(query_emb: np.ndarray, query_y: np.ndarray,
                   gallery_emb: np.ndarray, gallery_y: np.ndarray) -> float:
    """Share of queries whose nearest gallery item (cosine) has the query's label."""
    return float(np.mean(retrieval_hits(query_emb, query_y, gallery_emb, gallery_y)))


def retrieval_map(query_emb: np.ndarray, query_y: np.ndarray,
                  gallery_emb: np.ndarray, gallery_y: np.ndarray) -> float:
    """Mean average precision over the full ranking of the gallery (queries with no
    relevant gallery item are skipped)."""
    gallery_y = np.asarray(gallery_y)
    query_y = np.asarray(query_y)
    idx = _ranking(query_emb, gallery_emb, len(gallery_y))
    rel = gallery_y[idx] == query_y[:, None]  # (Q, G) relevance in rank order
    hits = rel.cumsum(axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    n_rel = rel.sum(axis=1)
    ap = (rel * hits / ranks).sum(axis=1) / np.maximum(n_rel, 1)
    return float(ap[n_rel > 0].mean()) if (n_rel > 0).any() else 0.0


def compatibility_matrix(query_embs: Mapping[str, np.ndarray], query_y: np.ndarray,
                         gallery_embs: Mapping[str, np.ndarray], gallery_y: np.ndarray
                         ) -> tuple[list[str], np.ndarray]:
    """M[i, j] = top-1 of generation i's queries against generation j's gallery.

    Pairs whose embedding sizes differ get NaN (not comparable).
    """
    names = list(query_embs)
    m = np.full((len(names), len(names)), np.nan)
    for i, qn in enumerate(names):
        for j, gn in enumerate(names):
            if query_embs[qn].shape[1] == gallery_embs[gn].shape[1]:
                m[i, j] = retrieval_top1(query_embs[qn], query_y, gallery_embs[gn], gallery_y)
    return names, m


def bct_criterion(m_new_old: float, m_old_old: float) -> bool:
    """BCT's empirical compatibility criterion: M(new, old) > M(old, old)."""
    return m_new_old > m_old_old
