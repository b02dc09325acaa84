"""Linearised fine-tuning (LQF: Linear Quadratic Fine-tuning, Achille et al., CVPR 2021).

A generation with `recipe: lqf` does not train the parent's network; it trains the
first-order Taylor expansion of it around the parent's weights w0:

    f_lin(x; w) = f(x; w0) + J(x; w0) (w - w0)

computed with forward-mode autodiff (`torch.func.jvp`): one forward pass carrying the
tangent `w - w0`, never a materialised Jacobian. Three things change together:

- the model: ReLU becomes leaky ReLU (slope from `arch.negative_slope`), because a ReLU's
  Jacobian is zero wherever a unit is off at w0, so those units could never move;
- the loss: square loss on one-hot targets scaled by `lqf.target_scale` -- with a model
  linear in w this is a convex quadratic in w;
- the optimiser: SGD with momentum on gradients preconditioned per Linear/Conv1d/Conv2d layer (and
  the cosine head) by a Kronecker-factored curvature A (x) G (K-FAC), with factored Tikhonov
  damping `lqf.damping`, factors refreshed every `lqf.update_interval` steps.

Because f_lin is linear in w, its Gauss-Newton curvature J^T J depends only on w0 and the
data, never on w: every curvature batch estimates the same matrix, so the factors are a
running mean over all batches seen (not an exponential average).

Serving: folding (serving the plain network at w0 + delta) is *not* exact -- a non-linear
network is not its own linearisation -- so an LQF checkpoint stores w0 and delta and
serves as `LinearizedNet` (`workers.models`, with the other architectures; one forward
pass plus a JVP, about 15x a plain forward of a small MLP on one core, measured: 1.3 vs
0.09 ms for 32 rows). `save_lqf` writes it in the checkpoint format of
`workers.checkpoint` (tensors only, `weights_only` loadable, sha256 verified, kind
"lqf"); `workers.checkpoint.load_model`, the one loader, dispatches on the kind and builds
it back.
`fold` is offered as an approximation for callers that need a plain network; its gap is
measured by benchmarks/lqf.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from workers.checkpoint import save_model
from workers.data import Split
from workers.models import CosineHead, GracefulNet, LinearizedNet, build_model, lqf_arch  # noqa: F401  (re-exported)
from workers.specs import GenerationSpec, LQFSpec, TrainSpec
from workers.training import ExtraLoss, log_rows, run_steps

def fold(model: LinearizedNet) -> GracefulNet:
    """The plain network at w0 + delta: a first-order approximation of `model`, not equal
    to it (the gap is second order in delta). For callers that cannot serve a JVP."""
    net = build_model(model.spec, model.input_shape, model.num_classes)
    with torch.no_grad():
        net.load_state_dict(model.folded_state(), strict=False)
    return net.eval()


def square_loss(logits: torch.Tensor, y: torch.Tensor, target_scale: float) -> torch.Tensor:
    """0.5 * mean over the batch of ||logits - target_scale * onehot(y)||^2.

    Example: logits [[1, 0], [0, 0]], y [0, 1], scale 2 -> targets [[2, 0], [0, 2]],
    squared residuals 1 + 0 and 0 + 4, loss 0.5 * (1 + 4) / 2 = 1.25.
    """
    target = target_scale * F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return 0.5 * (logits - target).pow(2).sum(-1).mean()


# --- K-FAC ------------------------------------------------------------------------------

def linear_factors(a: torch.Tensor, g: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K-FAC factors of a Linear layer: A = mean_b [a;1][a;1]^T, G = mean_b g g^T.

    `a` (B, in) are the layer's inputs, `g` (B, out) the per-sample gradients of the loss
    with respect to its outputs. The per-sample curvature block E[(a a^T) (x) (g g^T)] is
    approximated by A (x) G. Example, 2x2 without bias: a = [[1, 2], [3, 0]],
    g = [[1, 0], [0, 2]] -> A = ([[1, 2], [2, 4]] + [[9, 0], [0, 0]]) / 2 = [[5, 1], [1, 2]],
    G = ([[1, 0], [0, 0]] + [[0, 0], [0, 4]]) / 2 = [[0.5, 0], [0, 2]].
    """
    if bias:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
    return a.T @ a / a.shape[0], g.T @ g / g.shape[0]


def conv1d_factors(a: torch.Tensor, g: torch.Tensor, kernel_size: int, stride: int, padding: int,
                   bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K-FAC factors of a Conv1d layer (KFC, Grosse & Martens 2016).

    `a` (B, C_in, L) inputs, `g` (B, C_out, L_out) output gradients. Every output position
    t is a Linear layer on the patch a_t (C_in * k values, channel-major as in the weight's
    reshape (C_out, C_in * k)); assuming positions uncorrelated, the block is
    sum_t E[a_t a_t^T] (x) E[g_t g_t^T] = A (x) G with A the mean over batch and positions
    of a_t a_t^T and G the batch mean of sum_t g_t g_t^T.
    """
    patches = F.unfold(a.unsqueeze(2), (1, kernel_size), padding=(0, padding), stride=(1, stride))
    p = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B * L_out, C_in * k)
    if bias:
        p = torch.cat([p, p.new_ones(p.shape[0], 1)], 1)
    gt = g.transpose(1, 2).reshape(-1, g.shape[1])  # (B * L_out, C_out)
    return p.T @ p / p.shape[0], gt.T @ gt / g.shape[0]


def conv2d_factors(a: torch.Tensor, g: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], dilation: tuple[int, int], bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K-FAC factors of a Conv2d layer (KFC, Grosse & Martens 2016), as `conv1d_factors`
    with the output positions running over both spatial axes.

    `a` (B, C_in, H, W) inputs, `g` (B, C_out, H_out, W_out) output gradients; the patch
    a_t has C_in * kh * kw values in the order of the weight's reshape (C_out, -1).
    """
    patches = F.unfold(a, kernel_size, dilation=dilation, padding=padding, stride=stride)
    p = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B * H_out * W_out, C_in * kh * kw)
    if bias:
        p = torch.cat([p, p.new_ones(p.shape[0], 1)], 1)
    gt = g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])  # (B * H_out * W_out, C_out)
    return p.T @ p / p.shape[0], gt.T @ gt / g.shape[0]


def _kfac_covers(m: nn.Module) -> bool:
    """Layers with a K-FAC block: Linear, the cosine head, and ungrouped convolutions with
    numeric padding (grouped convolutions and padding='same' keep their plain gradient)."""
    if isinstance(m, (nn.Linear, CosineHead)):
        return True
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        ok = m.groups == 1 and not isinstance(m.padding, str) and m.padding_mode == "zeros"
        return ok and (isinstance(m, nn.Conv2d) or m.dilation[0] == 1)
    return False


def damped_inverses(A: torch.Tensor, G: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A + pi sqrt(l) I)^-1, (G + sqrt(l)/pi I)^-1 with pi^2 = (tr A / dim A) / (tr G / dim G).

    Factored Tikhonov damping (Martens & Grosse 2015): the product approximates
    A (x) G + l I while splitting l between the factors in proportion to their scales.
    """
    ta, tg = A.trace() / A.shape[0], G.trace() / G.shape[0]
    pi = torch.sqrt(ta / tg) if ta > 0 and tg > 0 else torch.tensor(1.0)
    r = math.sqrt(damping)
    eye = lambda n: torch.eye(n, dtype=A.dtype)  # noqa: E731
    return torch.linalg.inv(A + pi * r * eye(A.shape[0])), torch.linalg.inv(G + r / pi * eye(G.shape[0]))


@dataclass
class _Layer:
    module: nn.Module
    weight: int  # index into LinearizedNet.delta
    bias: Optional[int]
    A: Optional[torch.Tensor] = None
    G: Optional[torch.Tensor] = None
    inv: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    a: Optional[torch.Tensor] = field(default=None, repr=False)
    g: Optional[torch.Tensor] = field(default=None, repr=False)


class KFAC:
    """Kronecker-factored preconditioner of a `LinearizedNet`'s delta gradients.

    Covers every Linear, Conv1d and Conv2d layer of the network (`_kfac_covers`) and the cosine head (a bias-free
    linear map of the normalised embedding whose row c is scaled by scale / |w_c|; the
    projection onto the sphere's tangent plane is left out, it only removes the radial
    direction the logits do not depend on). Other parameters keep their plain gradient.
    """

    def __init__(self, model: LinearizedNet, damping: float, seed: int = 0):
        self.model, self.damping, self.updates = model, damping, 0
        self.gen = torch.Generator().manual_seed(seed)
        index = {n: i for i, n in enumerate(model.names)}
        self.layers: list[_Layer] = []
        for name, m in model.base.named_modules():
            if _kfac_covers(m) and f"{name}.weight" in index:
                b = index.get(f"{name}.bias") if getattr(m, "bias", None) is not None else None
                self.layers.append(_Layer(m, index[f"{name}.weight"], b))

    def _factors(self, L: _Layer) -> tuple[torch.Tensor, torch.Tensor]:
        m = L.module
        if isinstance(m, nn.Conv1d):
            return conv1d_factors(L.a, L.g, m.kernel_size[0], m.stride[0], m.padding[0], L.bias is not None)
        if isinstance(m, nn.Conv2d):
            return conv2d_factors(L.a, L.g, m.kernel_size, m.stride, m.padding, m.dilation, L.bias is not None)
        if isinstance(m, CosineHead):
            g = L.g * (m.scale / m.weight.norm(dim=1))
            return linear_factors(F.normalize(L.a, dim=-1), g, bias=False)
        if L.a.ndim > 2:  # a Linear on (B, ..., in), e.g. sequences: positions as in a conv
            batch = L.a.shape[0]
            A, G = linear_factors(L.a.reshape(-1, L.a.shape[-1]), L.g.reshape(-1, L.g.shape[-1]), L.bias is not None)
            return A, G * (L.g.numel() // L.g.shape[-1] / batch)
        return linear_factors(L.a, L.g, L.bias is not None)

    @torch.no_grad()
    def _capture(self, x: torch.Tensor) -> None:
        handles = []

        def hook(L: _Layer):
            def fwd(_m, inputs, out):
                L.a = inputs[0].detach()
                out.register_hook(lambda g: setattr(L, "g", g.detach()))
            return fwd

        for L in self.layers:
            handles.append(L.module.register_forward_hook(hook(L)))
        try:
            with torch.enable_grad():
                xg = x.detach().clone().requires_grad_(True)
                logits = self.model.base(xg)
                # Square loss: the output Hessian is I, so a standard-normal output gradient
                # gives E[g g^T] = J_s^T J_s, the exact Gauss-Newton factor in expectation.
                eps = torch.randn(logits.shape, generator=self.gen, dtype=logits.dtype)
                torch.autograd.grad(logits, xg, grad_outputs=eps)
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a curvature batch to the running means and refresh the damped inverses."""
        self._capture(x)
        self.updates += 1
        w = 1.0 / self.updates
        for L in self.layers:
            A, G = self._factors(L)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # Every worker must precondition identically or DDP replicas drift apart.
                for t in (A, G):
                    torch.distributed.all_reduce(t)
                    t /= torch.distributed.get_world_size()
            L.A = A if L.A is None else (1 - w) * L.A + w * A
            L.G = G if L.G is None else (1 - w) * L.G + w * G
            L.inv = damped_inverses(L.A, L.G, self.damping)
            L.a = L.g = None

    @torch.no_grad()
    def precondition(self) -> None:
        """Replace each covered layer's delta gradient by G^-1 grad A^-1 (in place)."""
        delta = self.model.delta
        for L in self.layers:
            if L.inv is None or delta[L.weight].grad is None:
                continue
            gw = delta[L.weight].grad
            mat = gw.reshape(gw.shape[0], -1)
            if L.bias is not None:
                mat = torch.cat([mat, delta[L.bias].grad.unsqueeze(1)], 1)
            A_inv, G_inv = L.inv
            out = G_inv @ mat @ A_inv
            if L.bias is not None:
                delta[L.bias].grad.copy_(out[:, -1])
                out = out[:, :-1]
            gw.copy_(out.reshape(gw.shape))


# --- the recipe -------------------------------------------------------------------------

class LQFRecipe:
    """Everything the training loop needs for `recipe: lqf`, built by `make_lqf`: a
    `workers.training.Recipe`, run by `workers.training.run_steps`.

    Per step the loop does:  loss = recipe.task_loss(logits, y) (+ compatibility terms);
    opt.zero_grad(); loss.backward(); recipe.before_step(step, x); opt.step(); sched.step().
    """

    def __init__(self, model: LinearizedNet, lqf: LQFSpec, train: TrainSpec):
        self.model, self.lqf, self.train = model, lqf, train
        self.kfac = KFAC(model, lqf.damping, seed=train.seed) if lqf.precondition else None
        # Decoupled weight decay on delta pulls w towards w0: the prior LQF's quadratic needs.
        self.opt = torch.optim.SGD(model.delta.parameters(), lr=train.lr, momentum=lqf.momentum,
                                   weight_decay=train.weight_decay)
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, train.steps)
                      if train.schedule == "cosine" else torch.optim.lr_scheduler.ConstantLR(self.opt, 1.0))

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return square_loss(logits, y, self.lqf.target_scale)

    def before_step(self, step: int, x: torch.Tensor) -> None:
        """Precondition the grads (K-FAC factors refreshed every `update_interval` steps),
        then scale the direction to the exact minimiser of the batch's square loss along it.

        The rescaling (Martens & Grosse 2015, sec. 6.4) is exact here because the model is
        linear: the loss along -t d is L0 - t <g, d> + t^2/2 d^T (J^T J / B) d, minimised at
        t* = <g, d> / d^T (J^T J / B) d. It makes the step size independent of how well the
        block-diagonal K-FAC (or, without it, the identity) matches the true curvature scale,
        so `train.lr` is a fraction of the exact step (momentum on top).
        """
        grads = [d.grad for d in self.model.delta]
        if any(g is None for g in grads):
            return
        raw = [g.clone() for g in grads] if self.lqf.exact_step else None
        if self.kfac is not None:
            if step % self.lqf.update_interval == 0:
                self.kfac.update(x)
            self.kfac.precondition()
        if raw is None:
            return
        slope = sum((r * g).sum() for r, g in zip(raw, grads))
        curv = self.model.curvature_along(x, tuple(grads))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # The batch is split across DDP workers: the curvature of the global batch is the
            # mean of theirs, and every replica must take the same step or they drift apart.
            curv = curv.detach().clone()
            torch.distributed.all_reduce(curv)
            curv /= torch.distributed.get_world_size()
        if curv > 0 and slope > 0:
            t = slope / curv
            for g in grads:
                g.mul_(t)


def make_lqf(parent: GracefulNet, gen: GenerationSpec) -> LQFRecipe:
    """Linearise `parent` for generation `gen` and build its loss and optimiser."""
    torch.manual_seed(gen.train.seed)
    return LQFRecipe(LinearizedNet(parent, gen.arch), gen.lqf, gen.train)


def fit_lqf(parent: GracefulNet, train: Split, gen: GenerationSpec, extra_loss: Optional[ExtraLoss] = None,
            val: Optional[Split] = None, log: Optional[Callable[[dict], None]] = None) -> LinearizedNet:
    """Single-process LQF fine-tuning of `parent` (the LQF analogue of `training.fit`)."""
    recipe = make_lqf(parent, gen)
    run_steps(recipe, train, gen.train, extra_loss=extra_loss, on_eval=log_rows(recipe.model, val, log))
    return recipe.model.eval()


# --- checkpoints ------------------------------------------------------------------------

def save_lqf(model: LinearizedNet, path: str | Path, meta: Optional[dict[str, Any]] = None) -> str:
    """Write an LQF checkpoint (w0 and delta) in the `workers.checkpoint` format; sha256."""
    return save_model(model, path, {**(meta or {}), "recipe": "lqf"}, kind="lqf")
