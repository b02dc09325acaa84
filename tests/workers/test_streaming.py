"""The pure parts of streaming data (`data.source: ray`, workers.streaming), without Ray:
the hash split, label noise, the checks on each batch, the eval-split cap, a worker's
batches from its shard, and the Focal Distillation term reading old logits from the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures_streaming import rows
from workers.data import DataError, load_dataset
from workers.specs import (CompatSpec, DataSpec, EnsembleSpec, FocalDistillationSpec, GenerationSpec, ScalingSpec,
                           TrainSpec)
from workers.streaming import (OLD_LOGITS, TEST, TRAIN, VAL, StreamPlan, collect_splits, cpu_shortfall, eval_rows,
                               noisy_labels, row_uniforms, split_rows, stream_batches, stream_fingerprint,
                               stream_problems, streams, train_rows)


def _batch(ids, **kw):
    x, y = rows(np.asarray(ids), **kw)
    return {"x": x, "y": y}


def test_row_hash_is_a_function_of_the_row_and_the_key_only():
    x, y = rows(np.arange(500))
    u = row_uniforms(x, y, key=3)
    assert u.shape == (500, 1) and ((u >= 0) & (u < 1)).all()
    # The same rows in other batches, in another order: the same values.
    again = np.concatenate([row_uniforms(x[250:], y[250:], 3), row_uniforms(x[:250], y[:250], 3)])
    assert np.array_equal(np.concatenate([u[250:], u[:250]]), again)
    assert not np.allclose(row_uniforms(x, y, key=4), u)
    # x is hashed as float32: a float64 copy of the same values hashes the same.
    assert np.array_equal(row_uniforms(x.astype(np.float64), y.astype(np.int32), 3), u)
    # Another label is another row.
    assert not np.array_equal(row_uniforms(x[:1], y[:1] + 1, 3), u[:1])


def test_the_hash_split_is_deterministic_and_has_the_configured_shares():
    x, y = rows(np.arange(20_000))
    tags, rank = split_rows(x, y, seed=0, test_fraction=0.2, val_fraction=0.1)
    again, _ = split_rows(x, y, seed=0, test_fraction=0.2, val_fraction=0.1)
    assert np.array_equal(tags, again)
    share = {t: float(np.mean(tags == t)) for t in (TRAIN, VAL, TEST)}
    assert share[TEST] == pytest.approx(0.2, abs=0.015) and share[VAL] == pytest.approx(0.1, abs=0.015)
    # train rows' rank is uniform on [0, 1): train_fraction 0.5 keeps about half of them
    r = rank[tags == TRAIN]
    assert ((r >= 0) & (r < 1)).all() and np.mean(r < 0.5) == pytest.approx(0.5, abs=0.02)
    other, _ = split_rows(x, y, seed=1, test_fraction=0.2, val_fraction=0.1)
    assert np.mean(other != tags) > 0.3  # another seed, another split
    # No held-out fractions: every row trains, rank = the row's uniform.
    all_train, r0 = split_rows(x, y, 0, 0.0, 0.0)
    assert (all_train == TRAIN).all() and np.array_equal(r0, row_uniforms(x, y, 0)[:, 0])


def _plan(**kw):
    base = dict(where="data.factory t:f", input_shape=(16,), num_classes=4, seed=0, test_fraction=0.2,
                val_fraction=0.1)
    return StreamPlan(**{**base, **kw})


def test_train_rows_and_eval_rows_partition_the_pool():
    b = _batch(np.arange(3000))
    train = train_rows(b, _plan())
    held = eval_rows(b, "w", seed=0, test_fraction=0.2, val_fraction=0.1)
    assert len(train["y"]) + len(held["y"]) == 3000
    assert train["x"].dtype == np.float32 and train["y"].dtype == np.int64
    seen = {r.tobytes() for r in train["x"]}
    assert not any(r.tobytes() in seen for r in held["x"])
    assert set(np.unique(held["split"])) == {VAL, TEST}


def test_a_larger_train_fraction_sees_a_superset():
    b = _batch(np.arange(3000))
    small = {r.tobytes() for r in train_rows(b, _plan(train_fraction=0.3))["x"]}
    large = {r.tobytes() for r in train_rows(b, _plan(train_fraction=0.6))["x"]}
    full = train_rows(b, _plan())["x"]
    assert small < large and len(small) == pytest.approx(0.3 * len(full), rel=0.1)


def test_label_noise_is_deterministic_by_row_and_seed():
    x, y = rows(np.arange(5000))
    a, b = noisy_labels(x, y, 0, 0.3, 4), noisy_labels(x, y, 0, 0.3, 4)
    assert np.array_equal(a, b) and ((a >= 0) & (a < 4)).all()
    # 30 % relabelled at random: 3/4 of those change class
    assert np.mean(a != y) == pytest.approx(0.3 * 0.75, abs=0.03)
    assert not np.array_equal(noisy_labels(x, y, 1, 0.3, 4), a)
    assert noisy_labels(x, y, 0, 0.0, 4) is y
    # in a stream: the same rows get the same labels whatever the batch
    p = _plan(test_fraction=0.0, val_fraction=0.0, label_noise=0.3)
    whole = train_rows({"x": x, "y": y}, p)["y"]
    parts = np.concatenate([train_rows({"x": x[i:i + 700], "y": y[i:i + 700]}, p)["y"] for i in range(0, 5000, 700)])
    assert np.array_equal(whole, parts) and np.array_equal(whole, a)


@pytest.mark.parametrize("batch, message", [
    ({"x": np.zeros((2, 16), np.float32)}, "columns 'x' and 'y'"),
    ({"x": np.zeros((2, 8), np.float32), "y": np.zeros(2, np.int64)}, "rows of shape (8,), expected (16,)"),
    ({"x": np.full((2, 16), np.nan, np.float32), "y": np.zeros(2, np.int64)}, "NaN or Inf"),
    ({"x": np.zeros((2, 16), np.float32), "y": np.array([0, 4])}, "outside [0, 4)"),
    ({"x": np.zeros((2, 16), np.float32), "y": np.array([0.0, 1.0])}, "integer class ids"),
    ({"x": np.array([np.zeros(16), np.zeros(3)], dtype=object), "y": np.zeros(2, np.int64)}, "different shapes"),
])
def test_each_training_batch_is_checked(batch, message):
    with pytest.raises(DataError, match="data.factory t:f") as e:
        train_rows(batch, _plan())
    assert message in str(e.value)


def test_rows_given_as_objects_and_empty_batches_are_accepted():
    x, y = rows(np.arange(10))
    obj = np.empty(10, dtype=object)
    obj[:] = list(x)
    out = train_rows({"x": obj, "y": y}, _plan(test_fraction=0.0, val_fraction=0.0))
    assert np.array_equal(out["x"], x)
    empty = train_rows({"x": np.zeros((0, 16), np.float32), "y": np.zeros(0, np.int64)}, _plan())
    assert empty["x"].shape == (0, 16) and empty["y"].shape == (0,)


def test_the_eval_splits_are_capped_and_the_read_stops_once_they_are_full():
    consumed = []

    def batches():
        for i in range(0, 20_000, 500):
            consumed.append(i)
            yield eval_rows(_batch(np.arange(i, i + 500)), "w", 0, 0.2, 0.1)

    got = collect_splits(batches(), cap=300, where="w", wanted=(VAL, TEST))
    assert len(got[VAL]) == 300 and len(got[TEST]) == 300
    assert len(consumed) < 10  # ~50 val rows per batch: full after 6 batches of the 40
    # The first rows in order: the same as from one big batch.
    whole = eval_rows(_batch(np.arange(20_000)), "w", 0, 0.2, 0.1)
    assert np.array_equal(got[TEST].x, whole["x"][whole["split"] == TEST][:300])
    assert np.array_equal(got[VAL].y, whole["y"][whole["split"] == VAL][:300])
    # A small dataset: every held-out row, fewer than the cap.
    held = eval_rows(_batch(np.arange(100)), "w", 0, 0.2, 0.1)
    small = collect_splits(iter([held]), 300, "w", (VAL, TEST))
    assert len(small[TEST]) == int(np.sum(held["split"] == TEST)) > 0
    assert len(small[VAL]) == int(np.sum(held["split"] == VAL)) > 0
    # One split given on its own (a factory's "test" Dataset): every row is of it.
    own = collect_splits(iter([_batch(np.arange(50)), _batch(np.arange(50, 100))]), 70, "w", (TEST,), tag=TEST)
    assert np.array_equal(own[TEST].x, rows(np.arange(70))[0])


def test_rows_of_another_shape_in_an_eval_split_are_refused():
    with pytest.raises(DataError, match=r"rows of shape \(8,\) after rows of shape \(16,\)"):
        collect_splits(iter([_batch([1, 2]), _batch([3, 4], dim=8)]), 10, "w", (TEST,), tag=TEST)


class FakeShard:
    """What `ray.train.get_dataset_shard` returns, as far as `stream_batches` uses it."""

    def __init__(self, n: int, extra: bool = True):
        self.n, self.extra, self.calls = n, extra, []

    def iter_torch_batches(self, **kw):
        self.calls.append(kw)
        size = kw["batch_size"]
        for i in range(0, self.n - size + 1, size):  # drop_last
            b = {"x": torch.full((size, 2), float(i)), "y": torch.zeros(size, dtype=torch.int64)}
            if self.extra:
                b[OLD_LOGITS] = torch.ones(size, 3)
            yield b


def test_a_worker_reads_its_shard_epoch_after_epoch():
    shard = FakeShard(10)
    it = stream_batches(shard, 4, seed=7)
    got = [next(it) for _ in range(5)]  # 2 batches an epoch: 3 epochs started
    assert [float(b.x[0, 0]) for b in got] == [0.0, 4.0, 0.0, 4.0, 0.0]
    assert all(b.idx is None and set(b.extras) == {OLD_LOGITS} for b in got)
    assert len(shard.calls) == 3 and all(c["drop_last"] and c["batch_size"] == 4 for c in shard.calls)
    assert [c["local_shuffle_seed"] for c in shard.calls] == [7, 8, 9]
    assert shard.calls[0]["local_shuffle_buffer_size"] == 16
    assert next(stream_batches(FakeShard(4, extra=False), 4)).extras == {}
    with pytest.raises(DataError, match="no batch of 8 rows in a whole epoch"):
        next(stream_batches(FakeShard(5), 8))


def test_focal_distillation_reads_the_old_logits_of_a_streamed_batch():
    """As the in-memory test (FD-LM, alpha 0, beta 1, weight 2, new logits 0): the old
    logits come from the batch's column, not from a cache indexed by row."""
    from workers.train import CompatTargets, make_extra_loss

    fd = FocalDistillationSpec(form="lm", alpha=0.0, beta=1.0, weight=2.0)
    extra = make_extra_loss(CompatSpec(focal_distillation=fd), CompatTargets(old_logits_column=OLD_LOGITS))
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    args = (None, torch.zeros(2, 3), torch.tensor([0, 0]), None, torch.ones(2, 2), torch.zeros(2, 2))
    assert extra(*args, old_logits=old).item() == pytest.approx(0.5)
    assert extra(*args, old_logits=torch.tensor([[0.0, 1.0], [0.0, 1.0]])).item() == 0.0  # old wrong on both
    with pytest.raises(KeyError, match="no column 'old_logits'"):
        extra(*args)


def test_the_step_loop_trains_on_streamed_batches_with_lqf_too():
    """run_batches over batches without row indices (a stream), for both recipes; it
    refuses to stop early when the batches run out."""
    from workers.lqf import make_lqf
    from workers.models import build_model
    from workers.specs import ArchSpec
    from workers.training import Batch, StandardRecipe, run_batches

    x, y = rows(np.arange(640))
    batches = [Batch(torch.as_tensor(x[i:i + 64]), torch.as_tensor(y[i:i + 64])) for i in range(0, 640, 64)]
    arch = ArchSpec(type="mlp", width=16, depth=1, embed_dim=8, activation="leaky_relu")
    spec = TrainSpec(steps=10, batch_size=64, eval_every=5)
    torch.manual_seed(0)
    plain = StandardRecipe(build_model(arch, (16,), 4), spec)
    losses = []
    run_batches(plain, batches, spec, on_eval=lambda step, loss: losses.append(loss))
    assert len(losses) == 2 and losses[1] < losses[0]
    lqf = make_lqf(plain.model, GenerationSpec(name="g1", arch=arch, recipe="lqf", train=spec))
    before = [d.detach().clone() for d in lqf.model.delta]
    run_batches(lqf, batches, spec)
    assert any(not torch.equal(a, b) for a, b in zip(before, lqf.model.delta))
    with pytest.raises(RuntimeError, match="ran out at step 10 of 11"):
        run_batches(StandardRecipe(build_model(arch, (16,), 4), spec), batches,
                    spec.model_copy(update={"steps": 11}))


def test_what_streams_and_what_is_refused():
    ray_data = DataSpec(source="ray", factory="tests.fixtures_streaming:blobs", num_classes=4)
    gen = GenerationSpec(name="g1")
    assert streams(ray_data, gen) and not streams(DataSpec(source="digits"), gen)
    own = gen.model_copy(update={"train_data": ray_data})
    assert streams(DataSpec(source="digits"), own)
    memory = gen.model_copy(update={"train_data": DataSpec(source="digits")})
    assert not streams(ray_data, memory)
    assert stream_problems(gen) == []
    ens = gen.model_copy(update={"compat": CompatSpec(ensemble=EnsembleSpec())})
    assert "compat.ensemble" in stream_problems(ens)[0]


def test_the_fingerprint_of_a_stream_is_of_what_selects_its_rows():
    data = DataSpec(source="ray", factory="tests.fixtures_streaming:blobs", num_classes=4)
    gen = GenerationSpec(name="g1")
    fp = stream_fingerprint(data, gen)
    assert fp.startswith("spec-") and fp == stream_fingerprint(data.model_copy(), gen)
    assert stream_fingerprint(data.model_copy(update={"eval_rows": 5}), gen) == fp  # eval rows are not trained on
    assert stream_fingerprint(data, gen.model_copy(update={"train_fraction": 0.5})) != fp
    assert stream_fingerprint(data.model_copy(update={"kwargs": {"n": 10}}), gen) != fp


def test_a_cluster_without_cpus_for_the_stream_is_warned_about():
    scaling = ScalingSpec(num_workers=2, cpus_per_worker=1.0)
    assert cpu_shortfall(4.0, scaling, old_model=True) is None
    msg = cpu_shortfall(2.0, scaling, old_model=True)
    assert "has 2 CPUs" in msg and "needs 2 more" in msg and "old model" in msg
    assert cpu_shortfall(3.0, scaling, old_model=False) is None


def test_source_ray_needs_num_classes_before_anything_is_read():
    with pytest.raises(DataError, match="data.num_classes"):
        load_dataset(DataSpec(source="ray", factory="tests.fixtures_streaming:blobs"))


def test_eval_rows_is_a_positive_data_setting():
    assert DataSpec().eval_rows == 10000
    with pytest.raises(ValueError):
        DataSpec(eval_rows=0)


def test_a_data_error_raised_in_a_ray_data_task_comes_back_as_itself():
    from workers.streaming import data_error_in, data_errors

    wrapped = RuntimeError('ray::MapBatches(train_rows)\n  File "workers/data.py", line 134\n'
                           'workers.data.DataError: data.factory m:f: y must hold integer class ids\n\n'
                           'ray.exceptions.UserCodeException: UDF failed to process a data block.')
    assert str(data_error_in(wrapped)) == "data.factory m:f: y must hold integer class ids"
    assert data_error_in(RuntimeError("something else")) is None
    with pytest.raises(DataError, match="^data.factory m:f: y must hold"):
        with data_errors():
            raise wrapped
    with pytest.raises(RuntimeError, match="something else"):
        with data_errors():
            raise RuntimeError("something else")
