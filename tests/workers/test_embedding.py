"""Catalogue items from each source, and their embedding in process (the Ray Data path
runs in tests/integration/test_catalogue.py)."""

from __future__ import annotations

import numpy as np
import pytest

from workers.data import DataError, load_dataset
from workers.embedding import embed_items, items_from_arrays, load_items, load_items_file
from workers.specs import DataSpec, ItemsSpec

DIGITS = DataSpec(source="digits", test_fraction=0.3, val_fraction=0.1)


def test_the_default_items_are_the_gallery_split_with_row_numbers_as_ids():
    items = load_items(ItemsSpec(), DIGITS)
    g = load_dataset(DIGITS).gallery
    assert items.ids.tolist() == [str(i) for i in range(len(g))]
    assert np.array_equal(items.x, g.x) and np.array_equal(items.labels, g.y)


def test_a_custom_factory_and_an_npz_give_their_ids_inputs_and_labels(tmp_path):
    items = load_items(ItemsSpec(source="custom", factory="tests.factories:catalogue_items", kwargs={"n": 5}), DIGITS)
    assert items.ids.tolist() == [f"sku-{i:05d}" for i in range(5)] and items.labels.tolist() == [0, 1, 2, 0, 1]
    path = tmp_path / "items.npz"
    np.savez(path, ids=np.array(["a", "b"]), x=np.ones((2, 4), np.float32))
    got = load_items(ItemsSpec(source="npz", path=path), DIGITS)
    assert got.ids.tolist() == ["a", "b"] and got.labels is None and got.x.shape == (2, 4)


def test_bad_items_are_named(tmp_path):
    with pytest.raises(DataError, match="2 ids for 3 rows"):
        load_items(ItemsSpec(source="custom", factory="tests.factories:catalogue_items_bad_shape"), DIGITS)
    with pytest.raises(DataError, match="NaN"):
        items_from_arrays(["a"], np.full((1, 4), np.nan))
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.ones((2, 4)))
    with pytest.raises(DataError, match="needs arrays 'ids' and 'x'"):
        load_items_file(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_items_file(path)


def test_embedding_in_process_equals_the_model_own_embeddings(tmp_path):
    """Without Ray the items are embedded here, in order, by the verified checkpoint."""
    from workers.checkpoint import save_model
    from workers.models import build_model
    from workers.specs import ArchSpec
    from workers.training import predict

    model = build_model(ArchSpec(type="mlp", width=8, depth=1, embed_dim=4), 64, 10)
    sha = save_model(model, tmp_path)
    x = load_dataset(DIGITS).gallery.x[:50]
    from workers.checkpoint import MODEL_FILE

    got = embed_items(x, str(tmp_path / MODEL_FILE), sha, batch_size=7)
    assert np.allclose(got, predict(model, x)[0], atol=1e-6)
