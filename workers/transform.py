"""Old-to-new embedding transformation (in the style of FCT, Ramanujan et al., NeurIPS 2022).

A gallery embedded by an old model can follow a new model without re-embedding a single
raw item: a small network h learns to map the old model's embedding of an input to the
new model's embedding of the same input, from pairs computed on training rows (inputs
the team has anyway, not the gallery's items), and is then applied to the stored
vectors. New queries are searched against h(stored vectors).

h(z) = normalise(W z + MLP(z)): a linear map plus a residual MLP, so it starts near the
best linear map and only learns the non-linear part on top. Trained by cosine loss
1 - cos(h(old), new), AdamW with cosine decay, in one process (small: a few thousand
pairs of 64-d vectors train in seconds on a CPU); the state kept is the one that scores
best on held-out pairs (retrieval top-1 when labels are given, else cosine), the linear
start included. Applying it costs one small MLP
forward a vector; `benchmarks/retrieval_scale.py` measures it per million vectors.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class EmbeddingTransform(nn.Module):
    """h: R^d_old -> R^d_new, unit-length outputs."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.linear = nn.Linear(d_in, d_out, bias=False)
        layers: list[nn.Module] = []
        width = d_in
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, d_out))
        self.mlp = nn.Sequential(*layers)
        nn.init.zeros_(self.mlp[-1].weight)  # starts as the linear map alone
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(z) + self.mlp(z), dim=-1)


def _check_pairs(old: np.ndarray, new: np.ndarray) -> None:
    if old.ndim != 2 or new.ndim != 2 or len(old) != len(new):
        raise ValueError(f"need (n, d_old) and (n, d_new) embeddings of the same rows, got {old.shape} and {new.shape}")
    if len(old) < 2:
        raise ValueError("need at least 2 pairs to fit a transformation")
    if not (np.isfinite(old).all() and np.isfinite(new).all()):
        raise ValueError("embeddings contain NaN or infinity")


def _held_out_cos(h: EmbeddingTransform, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((h(x) * y).sum(-1).mean())


def _held_out_top1(h: EmbeddingTransform, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor) -> float:
    """Retrieval top-1 on held-out rows: the new embeddings of one half as queries, h of the
    old embeddings of the other half as the gallery (what serving a transformed gallery does)."""
    half = len(x) // 2
    with torch.no_grad():
        nearest = (y[:half] @ h(x[half:]).T).argmax(1)
    return float((labels[half:][nearest] == labels[:half]).float().mean())


def fit_transform(old: np.ndarray, new: np.ndarray, *, labels: Optional[np.ndarray] = None, hidden: int = 256,
                  depth: int = 2, steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
                  weight_decay: float = 1e-4, seed: int = 0, holdout: float = 0.1,
                  log: Optional[Callable[[str], None]] = None) -> EmbeddingTransform:
    """Fit h on pairs (old[i], new[i]): the two models' embeddings of the same input.

    A `holdout` share of the pairs (none below 20 pairs) is kept out of training; h is
    scored on it at the linear start and ten times during training, and the best of these
    states is returned: by retrieval top-1 when the rows' class `labels` are given (new
    queries against h of old vectors, the quantity serving depends on), else by mean
    cosine to the new embeddings. Measured on MNIST-1D (benchmarks/compat_retrieval.py),
    the residual MLP raised the held-out cosine (0.73 -> 0.82) yet lowered retrieval
    against the linear start: with labels, the selection sees that. `h.fit_report` says
    which state won."""
    _check_pairs(old, new)
    torch.manual_seed(seed)
    x = F.normalize(torch.as_tensor(old, dtype=torch.float32), dim=-1)
    y = F.normalize(torch.as_tensor(new, dtype=torch.float32), dim=-1)
    rng = np.random.default_rng(seed)
    n_out = int(len(x) * holdout) if len(x) >= 20 else 0
    order = torch.as_tensor(rng.permutation(len(x)))
    (xo, yo), (x, y) = (x[order[:n_out]], y[order[:n_out]]), (x[order[n_out:]], y[order[n_out:]])
    h = EmbeddingTransform(x.shape[1], y.shape[1], hidden, depth)
    with torch.no_grad():  # least-squares start for the linear part
        h.linear.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != (len(old),):
            raise ValueError(f"labels: one class id per pair, got shape {lab.shape} for {len(old)} pairs")
        lab_out = torch.as_tensor(lab)[order[:n_out]]
    by = "top1" if labels is not None and n_out >= 2 else "cos"
    score = ((lambda: _held_out_top1(h, xo, yo, lab_out)) if by == "top1" else
             (lambda: _held_out_cos(h, xo, yo)) if n_out else (lambda: float("nan")))
    best = (score(), 0, {k: v.clone() for k, v in h.state_dict().items()})
    linear_cos = best[0]
    opt = torch.optim.AdamW(h.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    every = max(1, steps // 10)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.as_tensor(rng.integers(0, len(x), min(batch_size, len(x))))
        loss = (1 - (h(x[idx]) * y[idx]).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            cos = score()
            if not n_out or cos > best[0]:  # without a held-out share: the last state
                best = (cos, step + 1, {k: v.clone() for k, v in h.state_dict().items()})
            if log is not None:
                log(f"transformation step {step + 1}/{steps}: train 1 - cos {float(loss):.4f}, "
                    f"held-out {by} {cos:.4f} ({time.perf_counter() - t0:.1f}s)")
    last_cos = score()
    h.load_state_dict(best[2])
    h.fit_report = {"selected_by": by, "held_out_pairs": n_out, "held_out_linear": linear_cos,
                    "held_out_best": best[0], "held_out_last": last_cos, "step": best[1], "steps": steps}
    return h.eval()


@torch.no_grad()
def apply_transform(h: EmbeddingTransform, vectors: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """h of every stored vector, as float32 unit vectors, in batches."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[1] != h.d_in:
        raise ValueError(f"the transformation takes vectors of size {h.d_in}, got shape {v.shape}")
    out = np.empty((len(v), h.d_out), np.float32)
    for i in range(0, len(v), batch_size):
        z = F.normalize(torch.as_tensor(v[i:i + batch_size]), dim=-1)
        out[i:i + batch_size] = h(z).numpy()
    return out
