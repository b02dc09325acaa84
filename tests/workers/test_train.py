"""The compatibility terms the Ray Train loop adds, fed with cached outputs (no Ray)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from workers.losses import FrozenHead
from workers.specs import BCTSpec, CompatSpec, EnsembleSpec, FocalDistillationSpec
from workers.train import CompatTargets, make_extra_loss

# Cached rows r = 0..3: ensemble logits (r, 0); old logits favour class 0 on even rows.
ENSEMBLE = np.array([[r, 0.0] for r in range(4)], dtype=np.float32)
OLD = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)


def _call(extra, idx, y, z=None, logits=None):
    n = len(idx)
    z = torch.tensor([[1.0, 0.0]] * n) if z is None else z
    logits = torch.zeros(n, 2) if logits is None else logits
    return extra(None, torch.zeros(n, 3), torch.tensor(y), torch.tensor(idx), z, logits).item()


def test_cached_outputs_are_looked_up_by_batch_row():
    """Ensemble term, weight 0.5, new logits 0. Batch rows idx=(2, 0): targets (2,0), (0,0);
    squared differences 4,0,0,0 -> mean 1 -> 0.5. Rows (3, 1): 9,0,1,0 -> 2.5 -> 1.25.
    A loss that ignored idx (rows 0, 1) would give (0+0+1+0)/4*0.5 = 0.125 for both."""
    extra = make_extra_loss(CompatSpec(ensemble=EnsembleSpec(weight=0.5)), CompatTargets(ensemble_logits=ENSEMBLE))
    assert _call(extra, [2, 0], [0, 0]) == pytest.approx(0.5)
    assert _call(extra, [3, 1], [0, 0]) == pytest.approx(1.25)


def test_focal_weight_follows_the_cached_old_prediction_of_each_row():
    """FD-LM, alpha 0, beta 1, weight 2; new logits 0, so d_i = 1/2*||old_i||^2 = 0.5.
    y = 0 for both rows: row 0 (old says 0) counts, row 1 (old says 1) does not:
    mean(0.5, 0) * 2 = 0.5. Rows (1, 3): old wrong on both -> 0."""
    fd = FocalDistillationSpec(form="lm", alpha=0.0, beta=1.0, weight=2.0)
    extra = make_extra_loss(CompatSpec(focal_distillation=fd), CompatTargets(old_logits=OLD))
    assert _call(extra, [0, 1], [0, 0]) == pytest.approx(0.5)
    assert _call(extra, [1, 3], [0, 0]) == 0.0


def test_terms_add_up_with_their_weights():
    """BCT weight 3 through a cosine head (rows (1,0),(0,1), scale 2) at z=(1,0), y=0:
    CE log(1+e^-2) = 0.126928 -> 0.380784; plus the ensemble term of row 2 alone:
    (4+0)/2 * 0.5 = 1.0 -> 1.380784."""
    head = FrozenHead("g0", np.eye(2, dtype=np.float32), None, 2.0)
    compat = CompatSpec(bct=BCTSpec(weight=3.0), ensemble=EnsembleSpec(weight=0.5))
    extra = make_extra_loss(compat, CompatTargets(heads=[head], ensemble_logits=ENSEMBLE))
    assert _call(extra, [2], [0]) == pytest.approx(3 * math.log1p(math.exp(-2)) + 1.0, rel=1e-5)


def test_no_terms_without_config_or_targets():
    assert make_extra_loss(CompatSpec(), CompatTargets(old_logits=OLD)) is None
    # Configured but nothing cached (e.g. the first generation has no ancestors): no term.
    assert make_extra_loss(CompatSpec(bct=BCTSpec()), CompatTargets()) is None
    assert make_extra_loss(CompatSpec(bct=BCTSpec(weight=0.0)),
                           CompatTargets(heads=[FrozenHead("g0", np.eye(2, dtype=np.float32), None, 2.0)])) is None


def test_bct_skips_renormalising_only_for_models_with_unit_embeddings():
    """For a cosine model the term takes z as unit length (skipping work on every step);
    for others it normalises. z = (3, 0) is not unit: through the scale-2 eye head it gives
    logits (6, 0) when taken as is, (2, 0) when normalised: CE log(1+e^-6) vs log(1+e^-2)."""
    from workers.models import build_model
    from workers.specs import ArchSpec

    head = FrozenHead("g0", np.eye(2, dtype=np.float32), None, 2.0)
    extra = make_extra_loss(CompatSpec(bct=BCTSpec(weight=1.0)), CompatTargets(heads=[head]))
    z = torch.tensor([[3.0, 0.0]])
    cosine = build_model(ArchSpec(type="mlp", width=4, embed_dim=2, head="cosine"), 3, 2)
    linear = build_model(ArchSpec(type="mlp", width=4, embed_dim=2, head="linear"), 3, 2)
    args = (torch.zeros(1, 3), torch.tensor([0]), torch.tensor([0]), z, torch.zeros(1, 2))
    assert extra(cosine, *args).item() == pytest.approx(math.log1p(math.exp(-6)), rel=1e-4)
    assert extra(linear, *args).item() == pytest.approx(math.log1p(math.exp(-2)), rel=1e-5)
    assert extra(None, *args).item() == pytest.approx(math.log1p(math.exp(-2)), rel=1e-5)


# --- BCT against an LQF ancestor ---------------------------------------------------------------

def _saved_lqf(tmp_path, head: str = "cosine"):
    from tests.helpers import moved_lqf
    from workers.lqf import save_lqf
    from workers.models import build_model
    from workers.specs import ArchSpec

    torch.manual_seed(0)
    lin = moved_lqf(build_model(ArchSpec(type="mlp", width=8, depth=1, embed_dim=4, head=head), 6, 3))
    sha = save_lqf(lin, tmp_path / "g1")
    return lin, sha


@pytest.mark.parametrize("head", ["cosine", "linear"])
def test_an_lqf_checkpoint_serves_as_a_bct_constraint(tmp_path, head):
    """The LQF generation's frozen head is its head with the folded weights w0 + delta
    (`LinearizedNet.head`); the BCT term through it is finite and trains the new model."""
    from workers.data import Split
    from workers.models import build_model
    from workers.specs import ArchSpec, DataSpec, GenerationSpec, ScalingSpec
    from workers.train import ConstraintModel, TrainJob, build_targets, constraint_head

    lin, sha = _saved_lqf(tmp_path, head)
    c = ConstraintModel("g1", str(tmp_path / "g1"), sha, importance=1.0)
    frozen = constraint_head(c)
    assert frozen.embed_dim == 4 and frozen.num_classes == 3
    z = torch.randn(5, 4)
    if head == "cosine":
        z = torch.nn.functional.normalize(z, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(frozen.logits(z, unit=head == "cosine"), lin.head(z), rtol=1e-5, atol=1e-5)
        # ... and it is not the parent's head: delta moved it.
        assert not torch.allclose(lin.head(z), lin.base.head(z))

    # The real preparation path (BCT only: no Ray task is needed).
    gen = GenerationSpec(name="g2", arch=ArchSpec(type="mlp", width=8, depth=1, embed_dim=4, head=head),
                         compat=CompatSpec(bct=BCTSpec(weight=2.0)))
    job = TrainJob(generation=gen, data=DataSpec(source="digits"), scaling=ScalingSpec(), out_dir=str(tmp_path / "g2"),
                   storage_path=str(tmp_path / "ray"), run_name="g2", bct=(c,))
    x = torch.randn(16, 6)
    y = torch.arange(16) % 3
    targets = build_targets(job, Split(x.numpy(), y.numpy()), log=lambda _: None)
    assert len(targets.heads) == 1 and np.array_equal(targets.heads[0].weight, frozen.weight)
    extra = make_extra_loss(gen.compat, targets)
    torch.manual_seed(1)
    new = build_model(gen.arch, 6, 3)
    z, logits = new.embed_and_logits(x)
    loss = extra(new, x, y, torch.arange(16), z, logits)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in new.trunk.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # An LQF generation can itself be trained against an LQF ancestor (delta gets the gradient).
    from workers.lqf import LinearizedNet

    child = LinearizedNet(build_model(lin.spec, 6, 3))
    z, logits = child.embed_and_logits(x)
    loss = extra(child, x, y, torch.arange(16), z, logits)
    loss.backward()
    assert torch.isfinite(loss) and any(d.grad is not None and d.grad.abs().sum() > 0 for d in child.delta)


def test_an_lqf_model_with_a_cosine_head_has_unit_embeddings(tmp_path):
    from workers.train import _unit_embeddings

    lin, _ = _saved_lqf(tmp_path, "cosine")
    assert _unit_embeddings(lin)
    torch.testing.assert_close(lin.embed(torch.randn(3, 6)).norm(dim=-1), torch.ones(3))
    lin_linear, _ = _saved_lqf(tmp_path / "l", "linear")
    assert not _unit_embeddings(lin_linear)


# --- the ensemble-reference cache ------------------------------------------------------------

def _ens_gen(**train):
    from workers.specs import ArchSpec, GenerationSpec, TrainSpec

    return GenerationSpec(name="g1", arch=ArchSpec(type="mlp", width=8, depth=1, embed_dim=4),
                          train=TrainSpec(steps=10, **train), compat=CompatSpec(ensemble=EnsembleSpec(members=2)))


def _split(seed: int = 0):
    from workers.data import Split

    rng = np.random.default_rng(seed)
    return Split(rng.standard_normal((10, 6)).astype(np.float32), rng.integers(0, 3, 10))


def test_the_ensemble_cache_key_covers_what_the_references_depend_on():
    from workers.specs import ArchSpec, DataSpec
    from workers.train import ensemble_cache_key

    gen, data, split = _ens_gen(), DataSpec(source="digits"), _split()
    key = ensemble_cache_key(gen, data, split)
    assert len(key) == 64 and key == ensemble_cache_key(_ens_gen(), DataSpec(source="digits"), _split())
    changed = {
        "arch": gen.model_copy(update={"arch": ArchSpec(type="mlp", width=16, depth=1, embed_dim=4)}),
        "seed": _ens_gen(seed=3),
        "lr": _ens_gen(lr=0.1),
        "steps": gen.model_copy(update={"train": gen.train.model_copy(update={"steps": 11})}),
        "members": gen.model_copy(update={"compat": CompatSpec(ensemble=EnsembleSpec(members=3))}),
        "train_fraction": gen.model_copy(update={"train_fraction": 0.5}),
        "label_noise": gen.model_copy(update={"label_noise": 0.1}),
    }
    keys = {what: ensemble_cache_key(g, data, split) for what, g in changed.items()}
    keys["data"] = ensemble_cache_key(gen, DataSpec(source="digits", seed=1), split)
    keys["split"] = ensemble_cache_key(gen, data, _split(1))
    assert key not in keys.values() and len(set(keys.values())) == len(keys), keys
    # What cannot change the references' logits does not change the key.
    assert ensemble_cache_key(gen.model_copy(update={"compat": CompatSpec(ensemble=EnsembleSpec(members=2, weight=3.0))}),
                              data, split) == key
    assert ensemble_cache_key(gen, DataSpec(source="digits", cache_dir="/elsewhere"), split) == key


def test_cached_ensemble_logits_are_read_back_under_their_key_and_cleared(tmp_path):
    from workers.specs import DataSpec, ScalingSpec
    from workers.train import TrainJob, build_targets, clear_caches, ensemble_cache_path

    job = TrainJob(generation=_ens_gen(), data=DataSpec(source="digits"), scaling=ScalingSpec(),
                   out_dir=str(tmp_path / "g1"), storage_path=str(tmp_path / "ray"), run_name="g1")
    split = _split()
    cache = ensemble_cache_path(job, split)
    cache.parent.mkdir(parents=True)
    want = np.arange(30, dtype=np.float32).reshape(10, 3)
    np.save(cache, want)
    lines: list[str] = []
    got = build_targets(job, split, log=lines.append).ensemble_logits  # from the cache: no Ray task
    assert np.array_equal(got, want) and any("ensemble logits from cache" in s for s in lines)
    # A changed seed looks elsewhere.
    assert ensemble_cache_path(dataclasses.replace(job, generation=_ens_gen(seed=5)), split) != cache
    old_style = tmp_path / "g1" / "ensemble_logits_0123456789abcdef_2.npy"
    np.save(old_style, want)
    (tmp_path / "g1" / "model.pt").write_bytes(b"kept")
    assert sorted(clear_caches(tmp_path / "g1")) == sorted([cache, old_style])
    assert not cache.exists() and not old_style.exists() and (tmp_path / "g1" / "model.pt").exists()
    assert clear_caches(tmp_path / "missing") == []


def _job(tmp_path, gen, production=None):
    from workers.specs import DataSpec, ScalingSpec
    from workers.train import TrainJob

    return TrainJob(gen, DataSpec(source="digits"), ScalingSpec(), str(tmp_path / "out"), str(tmp_path / "ray"),
                    "run", production=production)


def test_a_factory_that_fails_is_reported_on_the_driver_as_itself(tmp_path):
    from workers.factory import FactoryError
    from workers.specs import ArchSpec, GenerationSpec
    from workers.train import check_buildable

    gen = GenerationSpec(name="g0", arch=ArchSpec(type="custom", factory="tests.factories:failing"))
    with pytest.raises(FactoryError, match="tests.factories:failing"):
        check_buildable(_job(tmp_path, gen), (64,), 10)


def test_an_lqf_generation_cannot_add_classes_to_its_parent(tmp_path):
    from workers.checkpoint import save_model
    from workers.models import build_model
    from workers.specs import ArchSpec, GenerationSpec
    from workers.train import ConstraintModel, check_buildable

    arch = ArchSpec(type="mlp", width=8, depth=1, embed_dim=8)
    sha = save_model(build_model(arch, (64,), 5), tmp_path / "g0")
    parent = ConstraintModel("g0", str(tmp_path / "g0"), sha)
    gen = GenerationSpec(name="g1", arch=arch, recipe="lqf")
    check_buildable(_job(tmp_path, gen, parent), (64,), 5)  # the parent's classes: fine
    with pytest.raises(ValueError, match="cannot add classes"):
        check_buildable(_job(tmp_path, gen, parent), (64,), 7)
