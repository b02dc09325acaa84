"""Compatibility losses on tiny hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from workers.losses import (
    FrozenHead,
    ancestor_importances,
    bct_influence_loss,
    ensemble_distillation_loss,
    focal_distillation_loss,
    frozen_head,
)
from workers.models import LinearizedNet, UserNet, build_model
from workers.specs import ArchSpec

EYE_HEAD = FrozenHead("g0", np.eye(2, dtype=np.float32), None, 2.0)


def test_bct_hand_case_and_masking():
    """z=(1,0) through a cosine head with rows (1,0),(0,1), scale 2: logits (2, 0).
    CE for y=0: log(1 + e^-2) = 0.126928. A second sample of class 2 is unknown to the
    2-class head -> masked; the sum is divided by the batch size 2 -> 0.063464."""
    z = torch.tensor([[1.0, 0.0]])
    assert bct_influence_loss(z, torch.tensor([0]), [EYE_HEAD]).item() == pytest.approx(math.log1p(math.exp(-2)), rel=1e-5)
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert bct_influence_loss(z2, torch.tensor([0, 2]), [EYE_HEAD]).item() == pytest.approx(0.126928 / 2, rel=1e-4)


def test_bct_weights_heads_by_importance():
    """Head A scores z=(1,0), y=0 at CE 0.126928 (as above); head B (rows swapped) gives
    logits (0, 2): CE log(1 + e^2) = 2.126928. Importances 3:1 -> 0.75*0.126928 + 0.25*2.126928 = 0.626928."""
    a = FrozenHead("a", np.eye(2, dtype=np.float32), None, 2.0, importance=3)
    b = FrozenHead("b", np.eye(2, dtype=np.float32)[::-1].copy(), None, 2.0, importance=1)
    loss = bct_influence_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), [a, b])
    assert loss.item() == pytest.approx(0.626928, rel=1e-5)


def test_bct_refuses_other_embedding_sizes():
    with pytest.raises(ValueError, match="expects embeddings of size 2"):
        bct_influence_loss(torch.zeros(1, 3), torch.tensor([0]), [EYE_HEAD])


def test_bct_gradient_reaches_only_the_new_embedding():
    z = torch.tensor([[0.3, 0.8]], requires_grad=True)
    bct_influence_loss(z, torch.tensor([0]), [EYE_HEAD]).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_frozen_head_matches_the_model_head():
    for head in ("cosine", "linear"):
        m = build_model(ArchSpec(type="mlp", width=8, embed_dim=6, head=head), 5, 4)
        fh = frozen_head(m, "g0")
        z = torch.randn(3, 6)
        assert torch.allclose(fh.logits(z), m.head(z), atol=1e-5)


def test_focal_distillation_kl_hand_case():
    """old logits (0,0): p_old=(.5,.5); new (ln 3, 0): p_new=(.75,.25).
    KL(p_old||p_new) = .5 ln(.5/.75) + .5 ln(.5/.25) = 0.143841. Old argmax 0 == y -> weight
    alpha+beta = 0.5+2 = 2.5 -> 0.359603. With y=1 the old model is wrong -> weight 0.5 -> 0.071921."""
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[math.log(3.0), 0.0]])
    assert focal_distillation_loss(new, old, torch.tensor([0]), "kl", 0.5, 2.0).item() == pytest.approx(0.359603, rel=1e-5)
    assert focal_distillation_loss(new, old, torch.tensor([1]), "kl", 0.5, 2.0).item() == pytest.approx(0.071921, rel=1e-4)


def test_focal_distillation_temperature_scales_by_t_squared():
    """At T=2, logits halve: p_new=softmax(ln3/2, 0)=(sqrt3/(1+sqrt3), 1/(1+sqrt3))=(.633975,.366025);
    KL = .5 ln(.5/.633975) + .5 ln(.5/.366025) = 0.037252; times T^2=4 -> 0.149009 (weight 1)."""
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[math.log(3.0), 0.0]])
    got = focal_distillation_loss(new, old, torch.tensor([0]), "kl", 1.0, 0.0, temperature=2.0)
    assert got.item() == pytest.approx(0.149009, rel=1e-4)


def test_focal_distillation_lm_hand_case():
    """old (1,2), new (2,0): 1/2*((2-1)^2 + (0-2)^2) = 2.5; old argmax 1 == y=1 -> weight 0+1."""
    got = focal_distillation_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 2.0]]),
                                  torch.tensor([1]), "lm", 0.0, 1.0)
    assert got.item() == pytest.approx(2.5)
    zero = focal_distillation_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 2.0]]),
                                   torch.tensor([0]), "lm", 0.0, 1.0)
    assert zero.item() == 0.0  # old model wrong and alpha 0: nothing to preserve


def test_focal_distillation_ignores_new_classes():
    old = torch.tensor([[1.0, 2.0]])
    new = torch.tensor([[1.0, 2.0, 9.0]])
    assert focal_distillation_loss(new, old, torch.tensor([1]), "lm").item() == 0.0


def test_ensemble_distillation_hand_cases():
    """new (1,2,3), ensemble (0,5,1): differences (1,-3,2), squares (1,9,4).
    Mean 14/3. top-2 of the ensemble: classes 1 and 2 -> (9+4)/2 = 6.5.
    margin 1.5: (0, 1.5, 0.5)^2 -> (0 + 2.25 + 0.25)/3 = 0.833333."""
    new = torch.tensor([[1.0, 2.0, 3.0]])
    ens = torch.tensor([[0.0, 5.0, 1.0]])
    assert ensemble_distillation_loss(new, ens).item() == pytest.approx(14 / 3)
    assert ensemble_distillation_loss(new, ens, top_k=2).item() == pytest.approx(6.5)
    assert ensemble_distillation_loss(new, ens, margin=1.5).item() == pytest.approx(2.5 / 3)


def test_ancestor_importances():
    """Distances 1,2,3 with decay 0.5: 1, .5, .25 -> normalised 4/7, 2/7, 1/7."""
    assert ancestor_importances([1, 2, 3], 0.5) == pytest.approx([4 / 7, 2 / 7, 1 / 7])


# --- custom heads: a module FrozenHead ------------------------------------------------------


def _user(name: str, input_shape=(4,), classes: int = 3, **kwargs) -> UserNet:
    torch.manual_seed(0)
    model = build_model(ArchSpec(type="custom", factory=f"tests.factories:{name}", kwargs=kwargs), input_shape, classes)
    assert type(model) is UserNet
    return model


def test_frozen_head_of_a_method_head_is_a_frozen_module_with_the_right_dims():
    model = _user("own_heads", dim=6)
    fh = frozen_head(model, "g0", importance=0.5)
    assert fh.module is not None and fh.weight is None and fh.bias is None and fh.scale is None
    assert fh.dims == (3, 6) and (fh.num_classes, fh.embed_dim) == (3, 6) and fh.importance == 0.5
    assert all(not p.requires_grad for p in fh.module.parameters()) and not fh.module.training
    z = torch.randn(5, 6)
    torch.testing.assert_close(fh.logits(z), model.head(z))
    torch.testing.assert_close(fh.logits(z, unit=True), model.head(z))  # `unit` does not apply
    # A copy: training the model on does not move the frozen head.
    with torch.no_grad():
        model.net.cls.weight.add_(1.0)
    assert not torch.allclose(fh.logits(z), model.head(z))


def test_bct_through_a_module_head_is_the_cross_entropy_of_the_users_head():
    model = _user("own_heads", dim=6)
    fh = frozen_head(model, "g0")
    z = torch.randn(7, 6, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    loss = bct_influence_loss(z, y, [fh])
    torch.testing.assert_close(loss, F.cross_entropy(model.head(z), y))
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_bct_through_a_parameter_free_head_hand_case():
    """head(z) = 2 z (ScaledIdentityHead): z = (1, 0) gives logits (2, 0), CE for y = 0 is
    log(1 + e^-2) = 0.126928, as for the cosine EYE_HEAD above; y = 1: log(1 + e^2) = 2.126928."""
    fh = frozen_head(_user("scaled_identity_head", classes=2), "g0")
    assert fh.module is not None and fh.dims == (2, 2)
    z = torch.tensor([[1.0, 0.0]])
    assert bct_influence_loss(z, torch.tensor([0]), [fh]).item() == pytest.approx(0.126928, rel=1e-5)
    assert bct_influence_loss(z, torch.tensor([1]), [fh]).item() == pytest.approx(2.126928, rel=1e-5)


def test_bct_masks_classes_a_module_head_does_not_know():
    """Old 2-class head(z) = 2 z; batch of 3 with y = 0, 5, 1: the class-5 row is masked,
    the others cost log(1 + e^-2) each (z = (1, 0), y = 0 and z = (0, 1), y = 1), the sum is
    divided by the batch size 3: 2 * 0.126928 / 3 = 0.084619."""
    fh = frozen_head(_user("scaled_identity_head", classes=2), "g0")
    z = torch.tensor([[1.0, 0.0], [5.0, -5.0], [0.0, 1.0]])
    loss = bct_influence_loss(z, torch.tensor([0, 5, 1]), [fh])
    assert loss.item() == pytest.approx(2 * 0.126928 / 3, rel=1e-5)
    assert bct_influence_loss(z[1:2], torch.tensor([5]), [fh]).item() == 0.0  # nothing known


def test_frozen_head_of_a_head_submodule_and_of_an_lqf_user_net():
    sub = _user("submodule_head", dim=5)
    fh = frozen_head(sub, "g0")
    assert fh.module is None and fh.weight.shape == (3, 5) and fh.bias.shape == (3,)  # an nn.Linear: arrays
    z = torch.randn(4, 5)
    torch.testing.assert_close(fh.logits(z), sub.head(z), atol=1e-5, rtol=1e-5)
    lin = LinearizedNet(_user("own_heads", dim=6))
    with torch.no_grad():
        for d in lin.delta:
            d.copy_(0.1 * torch.randn_like(d))
    fl = frozen_head(lin, "g1")
    assert fl.module is not None and fl.dims == (3, 6)
    z = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(fl.logits(z), lin.head(z))


def test_focal_distillation_with_fewer_new_classes_than_old_uses_the_shared_ones():
    """A generation trained on fewer classes than its parent knew: the parent's extra
    logits are left out, so the loss equals the one on the shared classes."""
    new, old, y = torch.randn(4, 3), torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(focal_distillation_loss(new, old, y), focal_distillation_loss(new, old[:, :3], y))
