"""The persisted catalogue on real faiss and real files: built, searched by item id,
grown without touching stored vectors, refused when tampered with or fed bad items."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.catalogue import (CatalogueError, CatalogueIntegrityError, add_items, catalogue_path, create_catalogue,
                               item_ids, load_catalogue, read_manifest)
from serving.index import IndexSpec


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def vectors():
    return _unit(np.random.default_rng(0).normal(size=(300, 16)))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_each_item_finds_itself_by_its_id_after_a_reload(tmp_path, vectors, kind):
    spec = IndexSpec(type=kind, nlist=4, nprobe=4) if kind == "ivf" else IndexSpec(type=kind)
    ids = [f"photo-{i:04d}" for i in range(len(vectors))]
    m = create_catalogue(tmp_path / "cat", spec, "g0", vectors, ids, labels=np.arange(300) % 7)
    assert (m["version"], m["count"], m["dim"], m["counts"]) == (1, 300, 16, {"g0": 300})
    cat = load_catalogue(tmp_path / "cat")
    scores, got, labels = cat.search(vectors[:20], 3)
    assert [g[0] for g in got] == ids[:20]
    assert [lab[0] for lab in labels] == [i % 7 for i in range(20)]
    assert np.allclose(scores[:, 0], 1.0, atol=1e-4)


def test_added_items_join_without_changing_stored_vectors(tmp_path, vectors):
    """100 items by g0, then 50 by g1: the first 100 answer exactly as before (same ids,
    same scores), the new ones are found by id, the manifest counts each generation, and
    only the current and the previous version's files are kept."""
    d = tmp_path / "cat"
    create_catalogue(d, IndexSpec(), "g0", vectors[:100], range(100))
    before = load_catalogue(d).search(vectors[:100], 5)
    m = add_items(d, "g1", vectors[100:150], [f"new-{i}" for i in range(50)], labels=np.ones(50, np.int64))
    assert (m["version"], m["count"], m["counts"], m["generations"]) == (2, 150, {"g0": 100, "g1": 50}, ["g0", "g1"])
    cat = load_catalogue(d)
    assert cat.search(vectors[100:110], 1)[1] == [[f"new-{i}"] for i in range(10)]
    assert (cat.generation == 0).sum() == 100 and (cat.generation == 1).sum() == 50
    assert cat.labels[:100].tolist() == [-1] * 100  # unknown labels stay unknown
    s0, i0, _ = before
    s1, i1, _ = cat.search(vectors[:100], 5)
    old = [[x for x in row if not x.startswith("new-")] for row in i1]
    assert all(a[:len(b)] == b for a, b in zip(i0, old))
    add_items(d, "g1", vectors[150:160], [f"more-{i}" for i in range(10)])
    names = sorted(p.name for p in d.iterdir() if not p.name.startswith("."))
    assert names == ["index.2.faiss", "index.3.faiss", "items.2.npz", "items.3.npz", "manifest.json"]


def test_an_id_already_present_or_another_size_is_refused_and_nothing_changes(tmp_path, vectors):
    d = tmp_path / "cat"
    create_catalogue(d, IndexSpec(), "g0", vectors[:10], range(10))
    with pytest.raises(CatalogueError, match=r"already in the catalogue: \['3'\]"):
        add_items(d, "g1", vectors[10:12], ["new", 3])
    with pytest.raises(CatalogueError, match="embeds into 8 dimensions, the catalogue .* holds 16"):
        add_items(d, "g1", vectors[10:12, :8], ["a", "b"])
    with pytest.raises(CatalogueError, match="NaN"):
        add_items(d, "g1", np.full((1, 16), np.nan), ["c"])
    assert read_manifest(d)["version"] == 1 and len(load_catalogue(d)) == 10
    with pytest.raises(CatalogueError, match="a catalogue exists"):
        create_catalogue(d, IndexSpec(), "g0", vectors[:10], range(10))


def test_a_changed_index_or_items_file_is_refused_before_it_is_parsed(tmp_path, vectors):
    d = tmp_path / "cat"
    create_catalogue(d, IndexSpec(), "g0", vectors[:10], range(10))
    m = json.loads((d / "manifest.json").read_text())
    f = d / m["items_file"]
    f.write_bytes(f.read_bytes() + b"x")
    with pytest.raises(CatalogueIntegrityError, match="changed since the manifest recorded it"):
        load_catalogue(d)
    f.unlink()
    with pytest.raises(CatalogueIntegrityError, match="missing"):
        load_catalogue(d)


def test_bad_ids_are_named():
    with pytest.raises(CatalogueError, match="'a' appears more than once"):
        item_ids(["a", "b", "a"])
    with pytest.raises(CatalogueError, match="#1: a string or an integer, got float"):
        item_ids(["a", 1.5])
    with pytest.raises(CatalogueError, match="#0: 1 to 256 printable"):
        item_ids([""])
    assert item_ids([7, "x"]).tolist() == ["7", "x"]


def test_paths_and_file_uris_are_read_other_schemes_are_refused(tmp_path):
    assert catalogue_path(f"file://{tmp_path}") == tmp_path
    with pytest.raises(CatalogueError, match="only local paths and file:// URIs"):
        catalogue_path("s3://bucket/cat")
    assert read_manifest(tmp_path / "none") is None
    with pytest.raises(CatalogueError, match="no catalogue at"):
        load_catalogue(tmp_path / "none")


def test_replacing_vectors_moves_them_into_the_new_space_and_keeps_the_rest(tmp_path, vectors):
    """Rows 0 and 1 re-embedded by g1: found by their new vectors, their generation and
    `how` recorded, the other 8 untouched, the history noting the change; a caller that
    read an older version, repeated rows, or a new size for some rows only are refused
    and nothing changes."""
    from serving.catalogue import HOW, replace_vectors
    from serving.index import vectors_of

    d = tmp_path / "cat"
    create_catalogue(d, IndexSpec(), "g0", vectors[:10], [f"i{k}" for k in range(10)])
    m = replace_vectors(d, np.array([0, 1]), vectors[20:22], "g1", "reembedded", {"share": 0.2}, expect_version=1)
    cat = load_catalogue(d)
    assert m["counts"] == {"g0": 8, "g1": 2} and m["history"][-1] == {"op": "reembedded", "generation": "g1",
                                                                     "items": 2, "share": 0.2}
    assert cat.search(vectors[20:22], 1)[1] == [["i0"], ["i1"]]
    assert np.allclose(vectors_of(cat.index)[2:], vectors[2:10], atol=1e-6)
    assert cat.generation.tolist() == [1, 1] + [0] * 8 and [HOW[h] for h in cat.how[:3]] == [
        "reembedded", "reembedded", "embedded"]
    with pytest.raises(CatalogueError, match="changed .*version 2, expected 1"):
        replace_vectors(d, np.array([3]), vectors[30:31], "g1", "reembedded", expect_version=1)
    with pytest.raises(CatalogueError, match="rows repeat"):
        replace_vectors(d, np.array([3, 3]), vectors[30:32], "g1", "reembedded")
    with pytest.raises(CatalogueError, match="only a replacement of every vector can change the size"):
        replace_vectors(d, np.array([3]), vectors[30:31, :8], "g1", "transformed")
    assert read_manifest(d)["version"] == 2
    m = replace_vectors(d, np.arange(10), vectors[40:50, :8], "g2", "transformed")  # all rows: a new size
    assert (m["dim"], m["counts"]) == (8, {"g2": 10})
