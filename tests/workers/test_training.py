"""The training loop: `fit` learns and is deterministic by seed; the shared `run_steps` resumes
bit-identically, shards the global batch and calls its hooks in order; batch indices align."""

from __future__ import annotations

import copy

import numpy as np
import torch

from workers.data import load_dataset
from workers.models import build_model
from workers.specs import ArchSpec, DataSpec, TrainSpec
from workers.training import StandardRecipe, accuracy, batch_indices, fit, run_steps


def test_fit_learns_digits_and_is_deterministic():
    ds = load_dataset(DataSpec(source="digits"))
    spec = TrainSpec(steps=150, batch_size=64, lr=3e-3, seed=0)
    rows = []
    a = fit(build_model(ArchSpec(type="mlp", width=32, depth=2), ds.input_dim, ds.num_classes),
            ds.train, spec, val=ds.val, log=rows.append)
    assert accuracy(a, ds.test) > 0.85
    assert rows[-1]["step"] == 150 and "val_accuracy" in rows[-1]
    torch.manual_seed(123)  # the loop reseeds by spec.seed, but the model init must be seeded too
    b0 = build_model(ArchSpec(type="mlp", width=32, depth=2), ds.input_dim, ds.num_classes)
    torch.manual_seed(123)
    c0 = build_model(ArchSpec(type="mlp", width=32, depth=2), ds.input_dim, ds.num_classes)
    b, c = fit(b0, ds.train, spec), fit(c0, ds.train, spec)
    x = torch.as_tensor(ds.test.x)
    assert torch.equal(b(x), c(x))


def test_extra_loss_sees_the_rows_of_the_batch():
    ds = load_dataset(DataSpec(source="digits"))
    seen = []

    def extra(model, x, y, idx, z, logits):
        # idx must point at the rows the batch was cut from
        assert torch.equal(torch.as_tensor(ds.train.x)[idx], x)
        seen.append(len(idx))
        return z.sum() * 0.0

    fit(build_model(ArchSpec(type="mlp", width=8), ds.input_dim, ds.num_classes), ds.train,
        TrainSpec(steps=5, batch_size=32), extra_loss=extra)
    assert seen == [32] * 5


def test_batches_cover_each_epoch_once():
    seen = np.concatenate([batch_indices(100, 10, s, seed=0) for s in range(10)])
    assert sorted(seen.tolist()) == list(range(100))


def _small(ds, seed=0):
    torch.manual_seed(seed)
    return build_model(ArchSpec(type="mlp", width=8, depth=1, embed_dim=8), ds.input_dim, ds.num_classes)


def test_run_steps_resumed_from_a_step_matches_the_uninterrupted_run():
    """What a restarted Ray Train worker relies on: restore model, optimiser and scheduler
    at step 10, continue with start=10, and get bit-identical weights."""
    ds = load_dataset(DataSpec(source="digits"))
    spec = TrainSpec(steps=20, batch_size=32, eval_every=10, seed=2)
    full = StandardRecipe(_small(ds), spec)
    saved = {}

    def keep(step, loss):
        if step == 10:
            saved.update(model=copy.deepcopy(full.model.state_dict()), opt=copy.deepcopy(full.opt.state_dict()),
                         sched=full.sched.state_dict())

    run_steps(full, ds.train, spec, on_eval=keep)
    resumed = StandardRecipe(_small(ds, seed=1), spec)
    resumed.model.load_state_dict(saved["model"])
    resumed.opt.load_state_dict(saved["opt"])
    resumed.sched.load_state_dict(saved["sched"])
    run_steps(resumed, ds.train, spec, start=10)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_steps_gives_each_worker_its_slice_of_the_global_batch():
    ds = load_dataset(DataSpec(source="digits"))
    spec = TrainSpec(steps=3, batch_size=10, seed=4)
    seen = {0: [], 1: []}
    for rank in (0, 1):
        def extra(model, x, y, idx, z, logits, rank=rank):
            seen[rank].append(idx.tolist())
            return z.sum() * 0.0

        run_steps(StandardRecipe(_small(ds), spec), ds.train, spec, extra_loss=extra, rank=rank, world=2)
    for step in range(3):
        batch = batch_indices(len(ds.train), 10, step, seed=4)
        assert seen[0][step] == batch[0::2].tolist() and seen[1][step] == batch[1::2].tolist()


def test_run_steps_calls_the_hooks_in_order():
    """before_step sees the gradients before the optimiser uses them; after_step follows
    every step; on_eval comes every eval_every steps and after the last."""
    ds = load_dataset(DataSpec(source="digits"))
    spec = TrainSpec(steps=5, batch_size=16, eval_every=2)
    calls = []

    class Recording(StandardRecipe):
        def before_step(self, step, x):
            p = next(self.model.parameters())
            calls.append(("before", step, p.grad is not None, torch.equal(p, weights[-1])))

    recipe = Recording(_small(ds), spec)
    weights = [next(recipe.model.parameters()).detach().clone()]

    def after(step):
        calls.append(("after", step))
        weights.append(next(recipe.model.parameters()).detach().clone())

    run_steps(recipe, ds.train, spec, after_step=after, on_eval=lambda step, loss: calls.append(("eval", step)))
    assert calls == [("before", 0, True, True), ("after", 0), ("before", 1, True, True), ("after", 1), ("eval", 2),
                     ("before", 2, True, True), ("after", 2), ("before", 3, True, True), ("after", 3), ("eval", 4),
                     ("before", 4, True, True), ("after", 4), ("eval", 5)]
