"""The compatibility terms the Ray Train loop adds, fed with cached outputs (no Ray)."""

from __future__ import annotations

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
