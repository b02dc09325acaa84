"""Backward-compatible weight interpolation (BCWI): the pure parts on hand cases, the
model-level parts on tiny networks, and the checks that run before any training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from workers.checkpoint import save_model
from workers.interpolation import (ALPHA_GRID, apply_interpolation, choose_alpha, interpolate_state, state_mismatch,
                                   val_errors_by_alpha)
from workers.models import build_model
from workers.specs import ArchSpec, DataSpec, GenerationSpec, ScalingSpec
from workers.train import ConstraintModel, TrainJob, check_buildable, constraint_records

MLP = ArchSpec(type="mlp", width=8, depth=1, embed_dim=4)


def test_interpolate_state_hand_case_and_integer_buffers():
    """w: 0.25 * (0, 4) + 0.75 * (2, 0) = (1.5, 1.0); the integer counter is the new model's (7)."""
    parent = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3)}
    new = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(7)}
    out = interpolate_state(parent, new, 0.25)
    assert torch.equal(out["w"], torch.tensor([1.5, 1.0]))
    assert int(out["n"]) == 7
    assert torch.equal(interpolate_state(parent, new, 0.0)["w"], new["w"])
    assert torch.equal(interpolate_state(parent, new, 1.0)["w"], parent["w"])
    with pytest.raises(ValueError, match="alpha must be in"):
        interpolate_state(parent, new, 1.5)


def test_state_mismatch_names_every_difference():
    parent = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    new = {"a": torch.zeros(2), "b": torch.zeros(4), "d": torch.zeros(1)}
    problems = state_mismatch(parent, new)
    assert problems == ["d: only in the new model", "c: only in the parent",
                        "b: shape (4,) in the new model, (3,) in the parent"]
    with pytest.raises(ValueError, match="cannot interpolate with the parent: d: only in the new model"):
        interpolate_state(parent, new, 0.5)


def test_choose_alpha_takes_the_largest_within_the_budget():
    """Budget 0.040 + 0.002 = 0.042: alphas 0.1 (0.041) and 0.2 (0.039) fit, 0.3 (0.046)
    does not -> 0.2. With no budget only alpha 0 (and 0.2, at 0.039 <= 0.040) fit -> 0.2;
    when every other alpha is worse, alpha 0 (the fine-tuned model)."""
    errors = {0.0: 0.040, 0.1: 0.041, 0.2: 0.039, 0.3: 0.046}
    assert choose_alpha(errors, 0.002) == 0.2
    assert choose_alpha(errors, 0.0) == 0.2
    assert choose_alpha({0.0: 0.04, 0.1: 0.05}, 0.0) == 0.0
    with pytest.raises(ValueError, match="alpha 0"):
        choose_alpha({0.1: 0.04}, 0.0)


def _pair():
    torch.manual_seed(0)
    parent = build_model(MLP, (6,), 3)
    torch.manual_seed(1)
    new = build_model(MLP, (6,), 3)
    return parent, new


def test_val_errors_by_alpha_leaves_the_model_as_it_was():
    parent, new = _pair()
    before = {k: v.clone() for k, v in new.state_dict().items()}
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 50)
    errors = val_errors_by_alpha(new, parent.state_dict(), x, y)
    assert sorted(errors) == list(ALPHA_GRID)
    assert all(0.0 <= e <= 1.0 for e in errors.values())
    assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())


def test_apply_interpolation_fixed_and_auto():
    parent, new = _pair()
    p, n = parent.state_dict(), {k: v.clone() for k, v in new.state_dict().items()}
    rec = apply_interpolation(new, p, 0.3, 0.0, np.zeros((0, 6), np.float32), np.zeros(0, np.int64))
    assert rec == {"alpha": 0.3}
    for k, v in new.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.3 * p[k] + 0.7 * n[k], atol=1e-6)
    # auto: labels are the parent's own predictions, so alpha moves as far toward it as the grid allows
    parent2, new2 = _pair()
    x = np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32)
    with torch.no_grad():
        y = parent2(torch.as_tensor(x)).argmax(1).numpy()
    rec = apply_interpolation(new2, parent2.state_dict(), "auto", 0.0, x, y)
    assert rec["alpha"] == choose_alpha({float(a): e for a, e in rec["val_error_by_alpha"].items()}, 0.0)
    assert rec["alpha"] > 0
    with pytest.raises(ValueError, match="validation split"):
        apply_interpolation(new2, parent2.state_dict(), "auto", 0.0, x[:0], y[:0])


def test_spec_validation():
    gen = GenerationSpec.model_validate({"name": "g1", "compat": {"weight_interpolation": {}}})
    assert gen.compat.weight_interpolation.alpha == "auto"
    assert GenerationSpec.model_validate(
        {"name": "g1", "compat": {"weight_interpolation": {"alpha": 0.3}}}).compat.weight_interpolation.alpha == 0.3
    with pytest.raises(ValidationError, match="alpha must be 'auto' or in"):
        GenerationSpec.model_validate({"name": "g1", "compat": {"weight_interpolation": {"alpha": 1.0}}})
    with pytest.raises(ValidationError, match="use one or the other"):
        GenerationSpec.model_validate({"name": "g1", "recipe": "lqf", "compat": {"weight_interpolation": {}}})


def _job(tmp_path, arch: ArchSpec, parent_arch: ArchSpec = MLP) -> TrainJob:
    torch.manual_seed(0)
    sha = save_model(build_model(parent_arch, (64,), 10), tmp_path / "g0")
    gen = GenerationSpec.model_validate({"name": "g1", "arch": arch.model_dump(),
                                         "compat": {"weight_interpolation": {"alpha": 0.2}}})
    return TrainJob(generation=gen, data=DataSpec(source="digits"), scaling=ScalingSpec(), out_dir=str(tmp_path / "g1"),
                    storage_path=str(tmp_path / "ray"), run_name="g1-x",
                    production=ConstraintModel("g0", str(tmp_path / "g0" / "model.pt"), sha))


def test_check_buildable_refuses_another_architecture_before_training(tmp_path):
    check_buildable(_job(tmp_path, MLP), (64,), 10)  # the parent's own architecture: fine
    wider = MLP.model_copy(update={"width": 16})
    with pytest.raises(ValueError, match=r"needs the parent's architecture, and 'g0' differs: .*shape \(16, 64\)"):
        check_buildable(_job(tmp_path, wider), (64,), 10)


def test_check_buildable_needs_a_parent(tmp_path):
    from dataclasses import replace

    with pytest.raises(ValueError, match="there is no parent"):
        check_buildable(replace(_job(tmp_path, MLP), production=None), (64,), 10)


def test_constraint_records_name_the_parent(tmp_path):
    job = _job(tmp_path, MLP)
    assert constraint_records(job) == [{"kind": "weight_interpolation", "name": "g0",
                                        "sha256": job.production.sha256, "alpha": 0.2}]


def test_check_buildable_refuses_an_lqf_parent(tmp_path):
    from dataclasses import replace

    from workers.lqf import make_lqf, save_lqf

    arch = ArchSpec(type="mlp", width=8, depth=1, embed_dim=4, activation="leaky_relu")
    torch.manual_seed(0)
    plain = build_model(arch, (64,), 10)
    lqf_gen = GenerationSpec.model_validate({"name": "g1", "arch": arch.model_dump(), "recipe": "lqf"})
    sha = save_lqf(make_lqf(plain, lqf_gen).model, tmp_path / "g1")
    job = replace(_job(tmp_path, arch), production=ConstraintModel("g1", str(tmp_path / "g1" / "model.pt"), sha))
    with pytest.raises(ValueError, match="is an LQF generation"):
        check_buildable(job, (64,), 10)
