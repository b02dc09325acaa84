"""The single-process training loop (the body each Ray Train worker runs, and what tests
and benchmarks call directly).

`fit` optimises task loss plus optional extra terms with AdamW and a cosine schedule.
Extra terms receive the batch's row indices, so cached outputs of older models can be
looked up aligned with the batch instead of recomputing them every step.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn import functional as F

from workers.data import Split
from workers.models import GracefulNet
from workers.specs import TrainSpec

# extra_loss(model, x, y, idx, embedding, logits) -> scalar tensor
ExtraLoss = Callable[[GracefulNet, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_optimizer(model: torch.nn.Module, spec: TrainSpec) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.schedule == "cosine":
        lam = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, spec.steps) / spec.steps))  # noqa: E731
    else:
        lam = lambda step: 1.0  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lam)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Row indices of batch `step`: epoch-wise permutations, deterministic by (seed, epoch)."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    return perm[k * batch_size:(k + 1) * batch_size] if n >= batch_size else perm


@torch.no_grad()
def predict(model: GracefulNet, x: np.ndarray, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, logits) of `model` on `x`, in eval mode, as numpy arrays."""
    was_training = model.training
    model.eval()
    embs, logits = [], []
    for i in range(0, len(x), batch_size):
        z, lg = model.embed_and_logits(torch.as_tensor(x[i:i + batch_size]))
        embs.append(z.numpy())
        logits.append(lg.numpy())
    model.train(was_training)
    return np.concatenate(embs), np.concatenate(logits)


def accuracy(model: GracefulNet, split: Split) -> float:
    _, logits = predict(model, split.x)
    return float(np.mean(logits.argmax(1) == split.y))


def fit(model: GracefulNet, train: Split, spec: TrainSpec, extra_loss: Optional[ExtraLoss] = None,
        val: Optional[Split] = None, log: Optional[Callable[[dict], None]] = None) -> GracefulNet:
    """Train `model` in place for `spec.steps` steps (single process)."""
    torch.manual_seed(spec.seed)
    opt, sched = make_optimizer(model, spec)
    x_all, y_all = torch.as_tensor(train.x), torch.as_tensor(train.y)
    model.train()
    for step in range(spec.steps):
        idx = torch.as_tensor(batch_indices(len(train), spec.batch_size, step, spec.seed))
        x, y = x_all[idx], y_all[idx]
        z, logits = model.embed_and_logits(x)
        loss = F.cross_entropy(logits, y)
        if extra_loss is not None:
            loss = loss + extra_loss(model, x, y, idx, z, logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and ((step + 1) % spec.eval_every == 0 or step + 1 == spec.steps):
            row = {"step": step + 1, "loss": float(loss.detach())}
            if val is not None and len(val):
                row["val_accuracy"] = accuracy(model, val)
            log(row)
    model.eval()
    return model
