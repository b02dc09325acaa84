"""Compatibility losses, added to the task loss of a new generation.

- BCT influence loss (Shen et al., CVPR 2020): the new embedding through the frozen
  classifier heads of older models, so new queries can search the old gallery.
- Focal Distillation (Yan et al., CVPR 2021): distil the production model with per-sample
  weight alpha + beta * [old model is right], in KL or logit-matching form.
- Ensemble distillation (in the style of ELODI, Zhao et al., CVPR 2022): match the mean
  logits of same-architecture reference models (mean squared logit difference).
All take tensors of the batch and cached old outputs aligned with it; none runs an old model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from workers.models import CosineHead, GracefulNet


@dataclass(frozen=True)
class FrozenHead:
    """The classifier head of an older model, as plain arrays (cheap to ship to workers).

    Cosine heads keep their row-normalised weight and scale; linear heads weight and bias.
    Any other head (a custom model's own `head(z)`) is kept as a frozen module copy
    (`module`, with `dims` = (classes, embedding size)).
    """

    name: str
    weight: Optional[np.ndarray]  # (C_old, D)
    bias: Optional[np.ndarray]  # (C_old,) for linear heads
    scale: Optional[float]  # cosine heads only
    importance: float = 1.0  # relative weight among the BCT constraints
    module: Optional[nn.Module] = None
    dims: Optional[tuple[int, int]] = None

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0]) if self.weight is not None else int(self.dims[0])  # type: ignore[index]

    @property
    def embed_dim(self) -> int:
        return int(self.weight.shape[1]) if self.weight is not None else int(self.dims[1])  # type: ignore[index]

    @cached_property
    def _tensors(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # Converted once: this runs on every training step.
        w = torch.as_tensor(self.weight)
        if self.scale is not None:
            return self.scale * w.T.contiguous(), None  # rows already normalised
        return w.T.contiguous(), torch.as_tensor(self.bias)

    def logits(self, z: torch.Tensor, unit: bool = False) -> torch.Tensor:
        """Old-head logits of embeddings `z`; `unit`: z is L2-normalised already (then the
        normalisation, the costliest part of this on every step, is skipped). A module
        head gets `z` as the old model's `head` would: `unit` does not apply to it."""
        if self.module is not None:
            m = self.module
            if next(m.parameters(), z).device != z.device:
                m.to(z.device)
            return m(z)
        wt, b = self._tensors
        wt = wt.to(dtype=z.dtype, device=z.device)
        if b is None:
            return (z if unit else F.normalize(z, dim=-1)) @ wt
        return torch.addmm(b.to(dtype=z.dtype, device=z.device), z, wt)


def frozen_head(model: "GracefulNet | nn.Module", name: str, importance: float = 1.0) -> FrozenHead:
    """Freeze `model`'s head: `model.classifier`, a `CosineHead` or `nn.Linear` into arrays,
    any other head module into a frozen copy. A `GracefulNet`, a custom `UserNet`, or an
    LQF `workers.lqf.LinearizedNet`, whose `classifier` is its head with the folded weights
    w0 + delta."""
    head = model.classifier
    if not isinstance(head, (CosineHead, nn.Linear)):
        frozen = copy.deepcopy(head).cpu().requires_grad_(False).eval()
        return FrozenHead(name, None, None, None, importance, module=frozen,
                          dims=(int(model.num_classes), int(model.embed_dim)))
    with torch.no_grad():
        if isinstance(head, CosineHead):
            return FrozenHead(name, F.normalize(head.weight, dim=-1).cpu().numpy(), None,
                              float(head.scale), importance)
        return FrozenHead(name, head.weight.cpu().numpy(), head.bias.cpu().numpy(), None, importance)


def bct_influence_loss(z: torch.Tensor, y: torch.Tensor, heads: Sequence[FrozenHead],
                       unit: bool = False) -> torch.Tensor:
    """Cross-entropy of the new embedding `z` through each frozen old head, weighted by the
    heads' importance (normalised to sum 1).

    Samples whose class an old head does not know (y >= its number of classes) are masked
    out for that head. The embedding sizes must match: a head of size D cannot score a
    D'-dimensional embedding, and a learned projection would change what the gallery
    compares, so we refuse instead (`ValueError`). `unit`: z is L2-normalised already.
    """
    if not heads:
        return z.new_zeros(())
    total = sum(h.importance for h in heads)
    top_class = int(y.max())
    loss = None
    for h in heads:
        if h.embed_dim != z.shape[1]:
            raise ValueError(
                f"BCT against {h.name!r}: its head expects embeddings of size {h.embed_dim}, the new "
                f"model produces {z.shape[1]}; use the same arch.embed_dim for compatible generations")
        if top_class < h.num_classes:  # the usual case; masking costs ops on every step
            ce = F.cross_entropy(h.logits(z, unit), y)
        else:
            known = y < h.num_classes
            if not bool(known.any()):
                continue
            ce = F.cross_entropy(h.logits(z[known], unit), y[known], reduction="sum") / len(y)
        term = ce if h.importance == total else (h.importance / total) * ce
        loss = term if loss is None else loss + term
    return z.new_zeros(()) if loss is None else loss


def focal_weights(old_logits: torch.Tensor, y: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Per-sample weight alpha + beta * [old model predicts y]."""
    return alpha + beta * (old_logits.argmax(dim=1) == y).to(old_logits.dtype)


def focal_distillation_loss(new_logits: torch.Tensor, old_logits: torch.Tensor, y: torch.Tensor,
                            form: str = "kl", alpha: float = 0.0, beta: float = 1.0,
                            temperature: float = 1.0) -> torch.Tensor:
    """Focal Distillation: mean over the batch of w_i * d_i, with w_i = alpha + beta*[old right].

    kl: d_i = T^2 * KL(softmax(old/T) || softmax(new/T)) (T^2 keeps gradients comparable
    across temperatures); lm: d_i = 1/2 * ||new_i - old_i||^2 (logit matching).
    The two may differ in classes (a generation that adds classes, or one trained on fewer
    than its parent knew): only the shared ones count.
    """
    c = min(old_logits.shape[1], new_logits.shape[1])
    new = new_logits if new_logits.shape[1] == c else new_logits[:, :c]
    old_logits = old_logits if old_logits.shape[1] == c else old_logits[:, :c]
    w = focal_weights(old_logits, y, alpha, beta)
    if form == "kl":
        t = temperature
        if t != 1.0:  # multiplying: its backward is cheaper than division's
            new, old_logits = new * (1.0 / t), old_logits * (1.0 / t)
        d = F.kl_div(F.log_softmax(new, dim=1), F.log_softmax(old_logits, dim=1),
                     reduction="none", log_target=True).sum(dim=1)
        return (w * d).mean() * (t * t)
    if form == "lm":
        return (w * (new - old_logits).pow(2).sum(dim=1)).mean() * 0.5
    raise ValueError(f"unknown focal distillation form {form!r} (kl or lm)")


def ensemble_distillation_loss(new_logits: torch.Tensor, ensemble_logits: torch.Tensor,
                               top_k: Optional[int] = None, margin: float = 0.0) -> torch.Tensor:
    """Mean squared difference between the new logits and the ensemble's mean logits.

    top_k: only the ensemble's K highest classes of each sample count (the tail of the
    logits carries little about the decision and much noise). margin: differences smaller
    than it cost nothing, (max(|d| - margin, 0))^2.
    """
    d = (new_logits - ensemble_logits).abs()
    if margin > 0:
        d = (d - margin).clamp_min(0.0)
    sq = d.pow(2)
    if top_k is not None and top_k < ensemble_logits.shape[1]:
        idx = ensemble_logits.topk(top_k, dim=1).indices
        return sq.gather(1, idx).mean()
    return sq.mean()


def ancestor_importances(distances: Sequence[int], decay: float) -> list[float]:
    """Weights decay**distance, normalised to sum 1 (distance 1 = the parent)."""
    raw = [decay ** d for d in distances]
    s = sum(raw)
    return [r / s for r in raw]
