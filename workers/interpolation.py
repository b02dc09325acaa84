"""Backward-compatible weight interpolation (BCWI, after Schumann et al., ICCV 2023).

A generation that starts from its parent's weights and is fine-tuned on new data can be
moved back toward the parent after training, with no extra training:

    theta = alpha * theta_parent + (1 - alpha) * theta_finetuned

alpha = 0 is the fine-tuned model, alpha = 1 the parent. Between the two, the
interpolated model keeps most of the fine-tuned model's gains while it disagrees less
with the parent, so it flips fewer of the parent's right answers. `alpha: auto` picks the
largest alpha of `ALPHA_GRID` whose validation error stays within the fine-tuned model's
plus `max_error_increase` (`choose_alpha`, a pure function).

Interpolation needs the two networks to have the same parameters (names and shapes): the
generation's architecture must be its parent's. Floating-point tensors (weights, biases,
normalisation statistics) are interpolated; integer buffers (e.g. BatchNorm's
`num_batches_tracked`) are the fine-tuned model's.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

# alpha values `auto` tries, smallest first; 0 (the fine-tuned model itself) is always allowed.
ALPHA_GRID: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)


def state_mismatch(parent: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps two state dicts from being interpolated, one line per problem (empty: none)."""
    problems = [f"{k}: only in the new model" for k in new if k not in parent]
    problems += [f"{k}: only in the parent" for k in parent if k not in new]
    problems += [f"{k}: shape {tuple(new[k].shape)} in the new model, {tuple(parent[k].shape)} in the parent"
                 for k in new if k in parent and new[k].shape != parent[k].shape]
    return problems


def interpolate_state(parent: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """alpha * parent + (1 - alpha) * new, key by key (integer tensors: new's).

    >>> interpolate_state({"w": torch.tensor([0.0, 4.0])}, {"w": torch.tensor([2.0, 0.0])}, 0.25)["w"]
    tensor([1.5000, 1.0000])

    (0.25 * 0 + 0.75 * 2 = 1.5; 0.25 * 4 + 0.75 * 0 = 1.0.)
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    problems = state_mismatch(parent, new)
    if problems:
        raise ValueError("cannot interpolate with the parent: " + "; ".join(problems[:5]))
    out: dict[str, torch.Tensor] = {}
    for k, v in new.items():
        p = parent[k].to(device=v.device)
        out[k] = torch.lerp(v, p.to(v.dtype), alpha) if v.is_floating_point() else v.clone()
    return out


def choose_alpha(val_errors: Mapping[float, float], max_error_increase: float) -> float:
    """The largest alpha whose validation error is at most the fine-tuned model's (alpha 0)
    plus `max_error_increase`.

    >>> choose_alpha({0.0: 0.040, 0.1: 0.041, 0.2: 0.039, 0.3: 0.046}, 0.002)
    0.2

    (budget 0.040 + 0.002 = 0.042: 0.1 (0.041) and 0.2 (0.039) fit, 0.3 (0.046) does not.)
    """
    if 0.0 not in val_errors:
        raise ValueError("val_errors needs alpha 0 (the fine-tuned model) as its reference")
    budget = val_errors[0.0] + max_error_increase
    return max(a for a, e in val_errors.items() if e <= budget + 1e-12)


def val_errors_by_alpha(model: nn.Module, parent_state: Mapping[str, torch.Tensor],
                        x: np.ndarray, y: np.ndarray, grid: Sequence[float] = ALPHA_GRID) -> dict[float, float]:
    """Validation error of `model` (the fine-tuned one, left as it was) moved to each alpha."""
    from workers.training import predict

    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[float, float] = {}
    try:
        for a in grid:
            model.load_state_dict(interpolate_state(parent_state, tuned, a))
            out[float(a)] = float(np.mean(predict(model, x)[1].argmax(1) != y))  # type: ignore[arg-type]
    finally:
        model.load_state_dict(tuned)
    return out


def apply_interpolation(model: nn.Module, parent_state: Mapping[str, torch.Tensor], alpha: "float | str",
                        max_error_increase: float, val_x: np.ndarray, val_y: np.ndarray) -> dict:
    """Move `model` (fine-tuned from the parent) to alpha in place; alpha `auto` chooses it
    on the validation rows. Returns what was done, for the generation's metrics."""
    record: dict = {}
    if alpha == "auto":
        if len(val_y) == 0:
            raise ValueError("compat.weight_interpolation.alpha auto chooses alpha on the validation split, "
                             "and it is empty: set data.val_fraction > 0 or a fixed alpha")
        errors = val_errors_by_alpha(model, parent_state, val_x, val_y)
        alpha = choose_alpha(errors, max_error_increase)
        record["val_error_by_alpha"] = {f"{a:g}": round(e, 6) for a, e in errors.items()}
    record["alpha"] = float(alpha)
    model.load_state_dict(interpolate_state(parent_state, model.state_dict(), float(alpha)))
    return record
