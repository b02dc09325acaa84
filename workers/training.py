"""The one training step loop (`run_batches`, and `run_steps` over in-memory data), and the
single-process entry point `fit`.

The loop is shared by every way a generation trains: `fit` here (tests, benchmarks,
ensemble references), `workers.lqf.fit_lqf`, and each Ray Train worker
(`workers.train._train_loop_per_worker`). What differs between them is passed in: the
recipe (model, optimiser, task loss, a hook between backward and the optimiser step: the
standard recipe's AdamW and cross-entropy, or LQF's SGD, square loss and K-FAC), the
forward (a DDP wrapper syncs gradients during backward), this worker's slice of the
global batch, the step to resume from, and what to do at each evaluation.

The loop itself (`run_batches`) takes any iterator of `Batch`es: `run_steps` feeds it the
in-memory batches (`memory_batches`: global batches drawn by seed and step, this worker's
slice), a Ray Train worker on a streamed dataset feeds it its shard's batches
(`workers.streaming.stream_batches`). Extra terms receive the batch's row indices, so
cached outputs of older models can be looked up aligned with the batch instead of
recomputing them every step; a streamed batch has no row indices (`idx` is None) and
carries such outputs as columns instead (`Batch.extras`, passed as keyword arguments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from workers.data import Split
from workers.models import GracefulNet
from workers.specs import TrainSpec

# extra_loss(model, x, y, idx, embedding, logits, **extras) -> scalar tensor; `model` is the
# network being trained (a GracefulNet, or an LQF LinearizedNet), never a DDP wrapper; `idx`
# the batch's rows in the in-memory split (None for a streamed batch); `extras` the batch's
# extra columns (`Batch.extras`, e.g. old_logits), passed only when there are any.
ExtraLoss = Callable[..., torch.Tensor]
# on_eval(steps_done, loss of the last batch): called every `eval_every` steps and after the last.
OnEval = Callable[[int, float], None]


class Recipe(Protocol):
    """What `run_steps` needs from a training recipe (`StandardRecipe`, `workers.lqf.LQFRecipe`)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def before_step(self, step: int, x: torch.Tensor) -> None:
        """Called after backward, before the optimiser step: may rewrite the gradients."""


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


class StandardRecipe:
    """The standard recipe: cross-entropy, AdamW with the spec's schedule, plain gradients."""

    def __init__(self, model: nn.Module, spec: TrainSpec):
        self.model = model
        self.opt, self.sched = make_optimizer(model, spec)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def before_step(self, step: int, x: torch.Tensor) -> None:
        pass


@dataclass
class Batch:
    """One worker's batch: inputs, labels, and where they come from."""

    x: torch.Tensor
    y: torch.Tensor
    idx: Optional[torch.Tensor] = None  # rows of the in-memory split; None for a streamed batch
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-row columns (e.g. old_logits)


def memory_batches(train: Split, spec: TrainSpec, *, rank: int = 0, world: int = 1, start: int = 0,
                   device: Optional[torch.device] = None) -> Iterator[Batch]:
    """This worker's slice `rank::world` of the global batches `start`, `start + 1`, ...
    (`batch_indices`: deterministic by seed and step) of the in-memory split `train`."""
    x_all = torch.as_tensor(train.x, device=device)
    y_all = torch.as_tensor(train.y, device=device)
    for step in range(start, spec.steps):
        idx = torch.as_tensor(batch_indices(len(train), spec.batch_size, step, spec.seed)[rank::world],
                              device=device)
        yield Batch(x_all[idx], y_all[idx], idx)


def run_batches(recipe: Recipe, batches: Iterable[Batch], spec: TrainSpec, *,
                extra_loss: Optional[ExtraLoss] = None,
                forward: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None,
                start: int = 0, after_step: Optional[Callable[[int], None]] = None,
                on_eval: Optional[OnEval] = None) -> None:
    """The step loop: train `recipe.model` in place for steps `start` .. `spec.steps - 1`,
    one batch of `batches` per step (RuntimeError if they run out first).

    Each step: task loss (+ `extra_loss`) on the batch, backward, `recipe.before_step`,
    optimiser and scheduler step, then `after_step(step)`, then `on_eval` when an
    evaluation is due. `forward(x) -> (embedding, logits)` defaults to the model's
    `embed_and_logits`; pass a DDP wrapper of it to all-reduce gradients during backward.
    """
    model = recipe.model
    forward = forward or model.embed_and_logits
    model.train()
    it = iter(batches)
    for step in range(start, spec.steps):
        batch = next(it, None)
        if batch is None:
            raise RuntimeError(f"the batches ran out at step {step} of {spec.steps}")
        x, y = batch.x, batch.y
        z, logits = forward(x)
        loss = recipe.task_loss(logits, y)
        if extra_loss is not None:
            # The model itself, not `forward`: terms inspect it (e.g. its head type).
            loss = loss + extra_loss(model, x, y, batch.idx, z, logits, **batch.extras)
        recipe.opt.zero_grad(set_to_none=True)
        loss.backward()
        recipe.before_step(step, x)
        recipe.opt.step()
        recipe.sched.step()
        if after_step is not None:
            after_step(step)
        if on_eval is not None and ((step + 1) % spec.eval_every == 0 or step + 1 == spec.steps):
            on_eval(step + 1, float(loss.detach()))


def run_steps(recipe: Recipe, train: Split, spec: TrainSpec, *, extra_loss: Optional[ExtraLoss] = None,
              forward: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None,
              rank: int = 0, world: int = 1, start: int = 0, device: Optional[torch.device] = None,
              after_step: Optional[Callable[[int], None]] = None, on_eval: Optional[OnEval] = None) -> None:
    """Train `recipe.model` in place on the in-memory split `train` for steps `start` ..
    `spec.steps - 1` (`run_batches` over `memory_batches`).

    With `world` > 1 every worker draws the same global batch (batch indices depend only
    on the seed and the step, so a resumed run sees the same batches) and trains on its
    slice `rank::world`. Setting the seed, building the recipe and restoring its state
    when resuming are the caller's.
    """
    run_batches(recipe, memory_batches(train, spec, rank=rank, world=world, start=start, device=device), spec,
                extra_loss=extra_loss, forward=forward, start=start, after_step=after_step, on_eval=on_eval)


def log_rows(model: nn.Module, val: Optional[Split],
             log: Optional[Callable[[dict], None]]) -> Optional[OnEval]:
    """The in-process `on_eval`: `log({"step", "loss"[, "val_accuracy"]})`; None without `log`."""
    if log is None:
        return None

    def on_eval(step: int, loss: float) -> None:
        row: dict = {"step": step, "loss": loss}
        if val is not None and len(val):
            row["val_accuracy"] = accuracy(model, val)  # type: ignore[arg-type]
        log(row)

    return on_eval


def fit(model: GracefulNet, train: Split, spec: TrainSpec, extra_loss: Optional[ExtraLoss] = None,
        val: Optional[Split] = None, log: Optional[Callable[[dict], None]] = None) -> GracefulNet:
    """Train `model` in place for `spec.steps` steps (single process)."""
    torch.manual_seed(spec.seed)
    run_steps(StandardRecipe(model, spec), train, spec, extra_loss=extra_loss, on_eval=log_rows(model, val, log))
    model.eval()
    return model
