"""Datasets: deterministic splits, caching, growing generations, user npz validation."""

from __future__ import annotations

import numpy as np
import pytest

from tests.factories import digits_images
from workers.data import (
    DataError,
    check_arrays,
    fingerprint,
    generation_data,
    generation_train_split,
    load_dataset,
    load_pool,
)
from workers.factory import FactoryError
from workers.specs import DataSpec, GenerationSpec


def test_digits_splits_are_disjoint_and_deterministic():
    spec = DataSpec(source="digits", seed=3, test_fraction=0.2, val_fraction=0.1)
    a, b = load_dataset(spec), load_dataset(spec)
    assert fingerprint(a.train) == fingerprint(b.train)
    n = len(a.train) + len(a.val) + len(a.test)
    assert n == 1797 and len(a.test) == round(1797 * 0.2) and a.num_classes == 10
    assert a.input_dim == 64
    rows = {r.tobytes() for r in a.train.x} & {r.tobytes() for r in a.test.x}
    assert not rows
    assert len(a.query) + len(a.gallery) == len(a.test)
    c = load_dataset(DataSpec(source="digits", seed=4))
    assert fingerprint(c.train) != fingerprint(a.train)


def test_mnist1d_is_generated_once_and_cached(cache_dir):
    spec = DataSpec(source="mnist1d", num_samples=1000, seed=0)
    state = np.random.get_state()[1].copy()
    a = load_dataset(spec)
    assert (np.random.get_state()[1] == state).all(), "global numpy RNG must be left untouched"
    files = list(cache_dir.glob("mnist1d_n1000_s0.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = load_dataset(spec)
    assert files[0].stat().st_mtime_ns == mtime
    assert fingerprint(a.test) == fingerprint(b.test)
    assert a.input_dim == 40 and a.num_classes == 10 and a.train.x.dtype == np.float32


def test_generations_see_growing_prefixes():
    ds = load_dataset(DataSpec(source="digits"))
    small = generation_train_split(ds, 0.2)
    big = generation_train_split(ds, 0.6)
    assert len(small) < len(big)
    assert np.array_equal(big.x[: len(small)], small.x)


def test_label_noise_changes_that_share_of_labels():
    """With noise 0.5, half the labels are redrawn uniformly over 10 classes, 1/10 of those
    land on the true class again -> about 45% change."""
    ds = load_dataset(DataSpec(source="digits"))
    clean = generation_train_split(ds, 1.0)
    noisy = generation_train_split(ds, 1.0, label_noise=0.5, seed=1)
    changed = np.mean(clean.y != noisy.y)
    assert 0.38 < changed < 0.52
    assert np.array_equal(noisy.y, generation_train_split(ds, 1.0, label_noise=0.5, seed=1).y)


def test_user_npz(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "mine.npz"
    np.savez(p, x=rng.normal(size=(100, 7)), y=rng.integers(0, 3, 100))
    ds = load_dataset(DataSpec(source="npz", path=p))
    assert ds.input_dim == 7 and ds.num_classes == 3


@pytest.mark.parametrize("arrays,match", [
    ({"x": np.zeros((5, 2))}, "needs arrays 'x' and 'y'"),
    ({"x": np.zeros((5, 2)), "y": np.zeros(4, int)}, "one label per row"),
    ({"x": np.zeros(5), "y": np.zeros(5, int)}, "x must be"),
    ({"x": np.full((5, 2), np.nan), "y": np.zeros(5, int)}, "NaN"),
    ({"x": np.zeros((5, 2)), "y": np.full(5, 0.5)}, "integer class ids"),
])
def test_bad_npz_is_a_clear_error(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=match):
        load_dataset(DataSpec(source="npz", path=p))


def test_npz_that_is_not_npz(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_text("hello")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset(DataSpec(source="npz", path=p))


# --- custom data factories ------------------------------------------------------------------


def _custom(name: str, **kw) -> DataSpec:
    return DataSpec(source="custom", factory=f"tests.factories:{name}", **kw)


def test_custom_images_are_split_by_seed_deterministically():
    a, b = load_dataset(_custom("digits_images", seed=3)), load_dataset(_custom("digits_images", seed=3))
    assert a.input_shape == (1, 8, 8) and a.input_dim == 64 and a.train.x.shape[1:] == (1, 8, 8)
    assert a.train.x.dtype == np.float32 and a.train.y.dtype == np.int64
    for s in ("train", "val", "test"):
        assert fingerprint(getattr(a, s)) == fingerprint(getattr(b, s))
    assert (len(a.train), len(a.val), len(a.test)) == (1797 - 359 - 180, 180, 359)  # 0.2, 0.1 of 1797
    rows = {r.tobytes() for r in a.train.x} & {r.tobytes() for r in a.test.x}
    assert not rows
    assert fingerprint(load_dataset(_custom("digits_images", seed=4)).train) != fingerprint(a.train)


def test_a_dict_of_splits_is_used_as_given():
    ds = load_dataset(_custom("digits_splits", seed=7, test_fraction=0.5))
    x, y = digits_images()
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1200, 200, 397)
    assert np.array_equal(ds.train.x, x[:1200]) and np.array_equal(ds.test.y, y[1400:])  # order kept
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10


def test_torch_tensors_are_accepted():
    ds = load_dataset(_custom("torch_tensors"))
    assert isinstance(ds.train.x, np.ndarray) and ds.input_shape == (1, 8, 8) and ds.train.y.dtype == np.int64


def test_num_classes_from_the_labels_or_from_the_config():
    assert load_dataset(_custom("digits_images")).num_classes == 10
    assert load_dataset(_custom("first_classes", kwargs={"classes": 3})).num_classes == 3  # kwargs passed
    assert load_dataset(_custom("digits_images", num_classes=12)).num_classes == 12


@pytest.mark.parametrize("name,kw,match", [
    ("with_nan", {}, r"data\.factory tests\.factories:with_nan: x contains NaN or Inf \(1 of 1797 rows\)"),
    ("float_labels", {}, r"tests\.factories:float_labels: y must hold integer class ids, got dtype float64"),
    ("short_labels", {}, (r"tests\.factories:short_labels: y must be \(N,\) with one label per row of x, "
                          r"got x \(1797, 1, 8, 8\) and y \(1796,\)")),
    ("strings", {}, r"tests\.factories:strings: x must hold numbers, got dtype <U1"),
    ("negative_labels", {}, r"tests\.factories:negative_labels: y must hold class ids >= 0, found -1"),
    ("digits_images", {"num_classes": 5}, r"holds class 9, outside \[0, 5\) \(data\.num_classes\)"),
    ("not_arrays", {}, r"tests\.factories:not_arrays: must return \(x, y\) or .*got int"),
    ("splits_without_test", {}, r"a dict of splits needs keys 'train' and 'test'.*got \['train', 'val'\]"),
    ("split_not_a_pair", {}, r"split 'test' must be a pair \(x, y\), got ndarray"),
    ("splits_of_other_shapes", {}, r"the splits' rows differ in shape"),
])
def test_bad_factory_data_is_refused_at_load_naming_the_problem(name, kw, match):
    with pytest.raises(DataError, match=match):
        load_dataset(_custom(name, **kw))


def test_a_data_factory_that_fails_is_a_factory_error_naming_it():
    with pytest.raises(FactoryError, match=r"data\.factory tests\.factories:first_classes\(\*\*\{'nope': 1\}\) failed"):
        load_dataset(_custom("first_classes", kwargs={"nope": 1}))
    with pytest.raises(FactoryError, match="cannot import 'nonexistent_pkg_xyz'"):
        load_dataset(DataSpec(source="custom", factory="nonexistent_pkg_xyz:load"))


def test_check_arrays_names_where_and_the_array():
    s = check_arrays([[1, 2], [3, 4]], [0, 1], "here")
    assert s.x.dtype == np.float32 and s.y.dtype == np.int64
    with pytest.raises(DataError, match=r"^here: y holds class 2, outside \[0, 2\)"):
        check_arrays(np.zeros((3, 2)), np.array([0, 1, 2]), "here", num_classes=2)
    with pytest.raises(DataError, match=r"^here: x contains NaN or Inf \(1 of 2 rows\)"):
        check_arrays(np.array([[0.0, np.inf], [0.0, 0.0]]), np.array([0, 1]), "here")
    with pytest.raises(DataError, match=r"^here: no rows"):
        check_arrays(np.zeros((0, 2)), np.zeros(0, dtype=int), "here")
    with pytest.raises(DataError, match=r"^here: x must be \(N, \*input_shape\)"):
        check_arrays(np.zeros(3), np.zeros(3, dtype=int), "here")


def test_a_generation_with_train_data_of_fewer_classes_keeps_the_runs_classes():
    ds = load_dataset(_custom("digits_images"))
    gen = GenerationSpec(name="g1", train_data=_custom("first_classes"))
    split, classes = generation_data(ds, gen)
    digits_y = digits_images()[1]
    assert classes == 10 and len(split) == int((digits_y < 5).sum()) and split.y.max() == 4
    assert split.x.shape[1:] == (1, 8, 8)
    half, _ = generation_data(ds, GenerationSpec(name="g1", train_data=_custom("first_classes"), train_fraction=0.5))
    assert len(half) == round(len(split) * 0.5) and np.array_equal(half.x, split.x[:len(half)])
    plain, plain_classes = generation_data(ds, GenerationSpec(name="g0"))
    assert plain_classes == 10 and fingerprint(plain) == fingerprint(ds.train)


def test_a_generation_with_train_data_of_new_classes_has_more_outputs():
    ds = load_dataset(_custom("first_classes"))
    assert ds.num_classes == 5
    split, classes = generation_data(ds, GenerationSpec(name="g1", train_data=_custom("digits_images")))
    assert classes == 10 and len(split) == 1797 and split.y.max() == 9
    _, declared = generation_data(ds, GenerationSpec(name="g1", train_data=_custom("first_classes", num_classes=7)))
    assert declared == 7
    noisy, _ = generation_data(ds, GenerationSpec(name="g1", train_data=_custom("digits_images"), label_noise=0.5))
    assert noisy.y.max() <= 9 and (noisy.y != split.y).any()


def test_train_data_of_another_input_shape_is_refused():
    ds = load_dataset(DataSpec(source="digits"))  # flat rows of 64
    gen = GenerationSpec(name="g1", train_data=_custom("digits_images"))
    with pytest.raises(DataError, match=r"train_data \(custom\): rows of shape \(1, 8, 8\), the run's data has \(64,\)"):
        generation_data(ds, gen)
    with pytest.raises(DataError, match=r"train_data: y holds class 9, outside \[0, 5\)"):
        load_pool(_custom("digits_images", num_classes=5), (1, 8, 8))
    with pytest.raises(DataError, match="x contains NaN"):
        load_pool(_custom("with_nan"), (1, 8, 8))


def test_custom_data_needs_a_factory_and_json_kwargs():
    with pytest.raises(ValueError, match="source 'custom' needs `factory"):
        DataSpec(source="custom")
    with pytest.raises(ValueError, match="are for source custom or ray, not 'digits'"):
        DataSpec(source="digits", factory="a.b:c")
    with pytest.raises(ValueError, match="kwargs must be plain JSON values"):
        _custom("digits_images", kwargs={"x": float("nan")})


def test_bfloat16_tensors_are_numbers():
    import torch

    s = check_arrays(torch.ones(4, 2, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.long), "w")
    assert s.x.dtype == np.float32 and s.x.shape == (4, 2)
