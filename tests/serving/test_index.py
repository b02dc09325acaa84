"""The retrieval index on real faiss: every kind finds what exact search finds on easy
data, keeps item ids, grows without a rebuild, and refuses a changed file or bad input."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from serving.index import (IndexSpec, RetrievalIndexError, add, build, default_nlist, item_ids_of, load,
                           memory_bytes, normalized, save, search, set_search_params)


def _clusters(n: int, dim: int = 32, centres: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around `centres` random directions, and queries near some of them."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    x = c[rng.integers(0, centres, n)] + 0.3 * rng.normal(size=(n, dim))
    q = x[rng.choice(n, min(n, 50), replace=False)] + 0.05 * rng.normal(size=(min(n, 50), dim))
    return x.astype(np.float32), q.astype(np.float32)


SPECS = {
    "flat": IndexSpec(type="flat"),
    "ivf": IndexSpec(type="ivf", nlist=16, nprobe=8),
    "ivfpq": IndexSpec(type="ivfpq", nlist=16, nprobe=8, pq_m=8),
    "hnsw": IndexSpec(type="hnsw", hnsw_m=16, ef_search=64),
}


@pytest.mark.parametrize("kind", list(SPECS))
def test_each_kind_returns_item_ids_close_to_exact_search(kind):
    x, q = _clusters(2000)
    ids = np.arange(2000) * 7 + 1000  # ids are not row numbers
    exact = build(SPECS["flat"], x, ids)
    index = build(SPECS[kind], x, ids)
    _, want = search(exact, q, 10)
    scores, got = search(index, q, 10)
    assert set(np.unique(got)) <= set(ids.tolist())
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    # product quantisation (4 dimensions a byte here) ranks near-ties roughly
    assert recall >= {"flat": 0.99, "hnsw": 0.99, "ivf": 0.6, "ivfpq": 0.3}[kind], recall
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first
    # the nearest neighbour of a gallery vector is itself
    _, self_hit = search(index, x[:5], 1)
    assert kind == "ivfpq" or list(self_hit[:, 0]) == list(ids[:5])


@pytest.mark.parametrize("kind", list(SPECS))
def test_items_added_later_are_found_and_saved_indexes_round_trip(kind, tmp_path):
    x, _ = _clusters(2000, seed=1)
    index = build(SPECS[kind], x[:1500], np.arange(1500))
    add(index, x[1500:], np.arange(1500, 2000) + 10_000)
    assert index.ntotal == 2000
    assert sorted(item_ids_of(index).tolist()) == list(range(1500)) + list(range(11_500, 12_000))
    sha = save(index, tmp_path / "gallery.faiss")
    again = load(tmp_path / "gallery.faiss", sha)
    set_search_params(again, SPECS[kind])
    a, b = search(index, x[1990:], 5), search(again, x[1990:], 5)
    assert np.array_equal(a[1], b[1])
    if kind != "ivfpq":  # product quantisation: the item itself need not come first
        assert list(b[1][:, 0]) == list(range(11_990, 12_000))


def test_a_changed_file_is_refused_before_faiss_reads_it(tmp_path):
    x, _ = _clusters(200)
    path = tmp_path / "g.faiss"
    sha = save(build(IndexSpec(), x, np.arange(200)), path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RetrievalIndexError, match="changed since it was recorded"):
        load(path, sha)
    with pytest.raises(RetrievalIndexError, match="index not found"):
        load(tmp_path / "missing.faiss", sha)
    path.write_bytes(b"not an index")
    with pytest.raises(RetrievalIndexError, match="cannot be read"):
        load(path)


def test_bad_input_is_named():
    x, _ = _clusters(100)
    index = build(IndexSpec(), x, np.arange(100))
    with pytest.raises(RetrievalIndexError, match="already in the index: \\[5\\]"):
        add(index, x[:1], np.array([5]))
    assert index.ntotal == 100
    with pytest.raises(RetrievalIndexError, match="size 32, got 16"):
        add(index, x[:2, :16], np.array([500, 501]))
    with pytest.raises(RetrievalIndexError, match="NaN"):
        search(index, np.full((1, 32), np.nan, np.float32), 3)
    with pytest.raises(RetrievalIndexError, match="need 3 ids"):
        build(IndexSpec(), x[:3], np.arange(2))
    with pytest.raises(RetrievalIndexError, match="repeat"):
        build(IndexSpec(), x[:3], np.array([1, 1, 2]))
    with pytest.raises(RetrievalIndexError, match="must be integers"):
        build(IndexSpec(), x[:3], np.array([1.0, 2.0, 3.0]))
    with pytest.raises(RetrievalIndexError, match="needs at least 64 vectors"):
        build(IndexSpec(type="ivf", nlist=64, nprobe=8), x[:50], np.arange(50))
    with pytest.raises(RetrievalIndexError, match="pq_m 5 must divide"):
        build(IndexSpec(type="ivfpq", nlist=2, nprobe=1, pq_m=5), x, np.arange(100))
    with pytest.raises(ValidationError, match="nprobe 32 exceeds nlist 16"):
        IndexSpec(type="ivf", nlist=16, nprobe=32)


def test_fewer_items_than_k_pad_with_minus_one():
    x, _ = _clusters(3)
    _, ids = search(build(IndexSpec(), x, np.array([10, 11, 12])), x[:1], 5)
    assert sorted(ids[0][:3].tolist()) == [10, 11, 12] and ids[0][3:].tolist() == [-1, -1]


def test_normalized_and_sizes():
    """(3, 4) has length 5 -> (0.6, 0.8); a zero row stays zero. A flat index of n vectors
    of size d holds at least 4 * n * d bytes; ivfpq with pq_m bytes a vector far fewer."""
    v = normalized(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(v, [[0.6, 0.8], [0.0, 0.0]])
    x, _ = _clusters(2000)
    flat = memory_bytes(build(IndexSpec(), x, np.arange(2000)))
    pq = memory_bytes(build(SPECS["ivfpq"], x, np.arange(2000)))
    assert flat >= 4 * 2000 * 32 and pq < flat / 2
    assert default_nlist(1_000_000) == 4000
