"""LQF: linearised forward vs finite differences, K-FAC factors by hand, loss, recipe, serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from workers.checkpoint import CheckpointError, load_model, save_model
from workers.data import Split
from workers.lqf import (
    KFAC,
    LinearizedNet,
    _kfac_covers,
    conv1d_factors,
    conv2d_factors,
    damped_inverses,
    fit_lqf,
    fold,
    linear_factors,
    make_lqf,
    save_lqf,
    square_loss,
)
from workers.models import build_model
from workers.specs import ArchSpec, GenerationSpec, LQFSpec, TrainSpec

LEAKY = dict(activation="leaky_relu", negative_slope=0.1)


def _parent(type_: str = "cnn1d", head: str = "cosine", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ArchSpec(type=type_, width=6, depth=2, embed_dim=5, head=head, **LEAKY), 16, 3)


def _set_delta(lin: LinearizedNet, tangents: list[torch.Tensor], eps: float) -> None:
    with torch.no_grad():
        for d, t in zip(lin.delta, tangents):
            d.copy_(eps * t)


@pytest.mark.parametrize("type_,head", [("cnn1d", "cosine"), ("mlp", "linear")])
def test_linearised_forward_matches_finite_difference_jvp(type_, head):
    parent = _parent(type_, head).double()
    lin = LinearizedNet(parent).double()
    x = torch.randn(7, 16, dtype=torch.float64)
    tangents = [torch.randn_like(p) for p in parent.parameters()]
    f0 = parent(x)
    # Central difference of the parent along the tangent: (f(w0 + h v) - f(w0 - h v)) / 2h.
    h = 1e-5
    outs = []
    for sign in (1, -1):
        moved = _parent(type_, head).double()
        moved.load_state_dict(parent.state_dict())
        with torch.no_grad():
            for p, t in zip(moved.parameters(), tangents):
                p.add_(sign * h * t)
        outs.append(moved(x))
    fd_jvp = (outs[0] - outs[1]) / (2 * h)
    eps = 0.3
    _set_delta(lin, tangents, eps)
    with torch.no_grad():
        got = lin(x)
    torch.testing.assert_close(got, f0 + eps * fd_jvp, rtol=1e-6, atol=1e-6)
    # And it is linear in delta, unlike the network: doubling delta doubles the change.
    _set_delta(lin, tangents, 2 * eps)
    with torch.no_grad():
        torch.testing.assert_close(lin(x) - f0, 2 * (got - f0), rtol=1e-9, atol=1e-9)


def test_linearised_model_starts_at_parent_and_trains_only_delta():
    parent = _parent()
    lin = LinearizedNet(parent)
    x = torch.randn(4, 16)
    z, logits = lin.embed_and_logits(x)
    z0, l0 = parent.embed_and_logits(x)
    torch.testing.assert_close(logits, l0)
    torch.testing.assert_close(z, z0)
    square_loss(logits, torch.tensor([0, 1, 2, 0]), 5.0).backward()
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in lin.delta)
    assert all(not p.requires_grad for p in lin.base.parameters())


def test_relu_parent_becomes_leaky_and_arch_must_match():
    relu = build_model(ArchSpec(width=6, depth=2), 16, 3)
    lin = LinearizedNet(relu, ArchSpec(width=6, depth=2, negative_slope=0.2))
    assert lin.spec.activation == "leaky_relu" and lin.spec.negative_slope == 0.2
    with pytest.raises(ValueError, match="width"):
        LinearizedNet(relu, ArchSpec(width=8, depth=2))


def test_square_loss_hand_case():
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # targets [[2, 0], [0, 2]]: residual^2 sums 1 and 4 -> 0.5 * 5 / 2
    assert square_loss(logits, torch.tensor([0, 1]), 2.0).item() == pytest.approx(1.25)


def test_linear_factors_hand_computed_2x2():
    a = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    A, G = linear_factors(a, g, bias=False)
    torch.testing.assert_close(A, torch.tensor([[5.0, 1.0], [1.0, 2.0]]))
    torch.testing.assert_close(G, torch.tensor([[0.5, 0.0], [0.0, 2.0]]))
    # With a bias the input gains a constant 1: [1,2,1] and [3,0,1] -> extra row/col means.
    A_b, _ = linear_factors(a, g, bias=True)
    torch.testing.assert_close(A_b, torch.tensor([[5.0, 1.0, 2.0], [1.0, 2.0, 1.0], [2.0, 1.0, 1.0]]))


def test_kfac_on_2x2_layer_is_exact_gauss_newton_per_sample():
    """For one sample the curvature block of a Linear layer IS a (x) g: K-FAC's A (x) G is
    then exact, so preconditioning with tiny damping solves the Newton system."""
    a = torch.tensor([[1.0, 2.0]])
    g = torch.tensor([[3.0, -1.0]])
    A, G = linear_factors(a, g, bias=False)  # A = [[1,2],[2,4]], G = [[9,-3],[-3,1]]
    torch.testing.assert_close(A, torch.tensor([[1.0, 2.0], [2.0, 4.0]]))
    torch.testing.assert_close(G, torch.tensor([[9.0, -3.0], [-3.0, 1.0]]))
    # Gauss-Newton of the 2x2 weight (row-major vec): J = g (x) a, F = J^T J = G (x) A.
    J = torch.kron(g, a)
    torch.testing.assert_close(J.T @ J, torch.kron(G, A))
    # Damped inverse of a PD factor pair approximates the inverse of (G (x) A + l I).
    A2 = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    G2 = torch.tensor([[1.0, 0.2], [0.2, 3.0]], dtype=torch.float64)
    A_inv, G_inv = damped_inverses(A2, G2, 1e-10)
    grad = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64)
    want = torch.linalg.solve(torch.kron(G2, A2), grad.reshape(-1)).reshape(2, 2)
    torch.testing.assert_close(G_inv @ grad @ A_inv, want, rtol=1e-4, atol=1e-4)


def test_conv1d_factors_equal_linear_factors_on_patches():
    # C_in = 1, k = 2, stride 1, no padding, L = 3: patches [x0, x1] and [x1, x2].
    a = torch.tensor([[[1.0, 2.0, 3.0]]])
    g = torch.tensor([[[1.0, -1.0]]])  # C_out = 1, L_out = 2
    A, G = conv1d_factors(a, g, kernel_size=2, stride=1, padding=0, bias=False)
    # A = mean of [1,2][1,2]^T and [2,3][2,3]^T = [[2.5, 4], [4, 6.5]]; G = 1 + 1 = 2 (sum over t)
    torch.testing.assert_close(A, torch.tensor([[2.5, 4.0], [4.0, 6.5]]))
    torch.testing.assert_close(G, torch.tensor([[2.0]]))


def test_kfac_hooks_capture_inputs_of_each_layer():
    parent = _parent("mlp", "linear")
    lin = LinearizedNet(parent)
    kfac = KFAC(lin, damping=1e-3)
    assert len(kfac.layers) == 4  # two hidden Linear, projection, linear head
    x = torch.randn(32, 16)
    kfac.update(x)
    first = kfac.layers[0]
    want_A, _ = linear_factors(x, torch.zeros(32, 6), bias=True)
    torch.testing.assert_close(first.A, want_A)
    # G of the head's output layer: E[eps eps^T] with eps ~ N(0, I) -> close to I on average.
    kfac2 = KFAC(LinearizedNet(parent), damping=1e-3, seed=1)
    for _ in range(30):
        kfac2.update(torch.randn(64, 16))
    torch.testing.assert_close(kfac2.layers[-1].G, torch.eye(3), atol=0.1, rtol=0)


def test_precondition_changes_grads_and_recipe_lowers_loss():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0).astype(np.int64)
    train = Split(x, y)
    parent = _parent()
    gen = GenerationSpec(name="g1", arch=parent.spec, recipe="lqf",
                         train=TrainSpec(steps=60, batch_size=64, lr=0.05),
                         lqf=LQFSpec(target_scale=4.0, damping=1e-2, update_interval=5))
    before = square_loss(LinearizedNet(parent)(torch.as_tensor(x)), torch.as_tensor(y), 4.0).item()
    lin = fit_lqf(parent, train, gen)
    with torch.no_grad():
        after = square_loss(lin(torch.as_tensor(x)), torch.as_tensor(y), 4.0).item()
    assert after < 0.7 * before
    # The preconditioner really changes the step direction.
    recipe = make_lqf(parent, gen)
    loss = recipe.task_loss(recipe.model(torch.as_tensor(x[:64])), torch.as_tensor(y[:64]))
    loss.backward()
    raw = [d.grad.clone() for d in recipe.model.delta]
    recipe.before_step(0, torch.as_tensor(x[:64]))
    assert any(not torch.allclose(r, d.grad) for r, d in zip(raw, recipe.model.delta))


def test_lqf_checkpoint_round_trip_serves_the_linearised_model(tmp_path):
    parent = _parent()
    lin = LinearizedNet(parent)
    _set_delta(lin, [torch.randn_like(p) for p in parent.parameters()], 0.1)
    sha = save_lqf(lin, tmp_path / "g1")
    served, meta = load_model(tmp_path / "g1", sha256=sha)
    assert meta["recipe"] == "lqf" and isinstance(served, LinearizedNet)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(served.embed_and_logits(x), lin.embed_and_logits(x))
    # Folding (the plain net at w0 + delta) is only first order: its gap to the linearised
    # model is second order, so halving delta quarters it.
    tangents = [torch.randn_like(p, dtype=torch.float64) for p in parent.parameters()]
    lin64 = LinearizedNet(parent).double()
    gaps = []
    for eps in (1e-4, 5e-5):
        _set_delta(lin64, tangents, eps)
        with torch.no_grad():
            gaps.append((fold(lin64).double()(x.double()) - lin64(x.double())).abs().max().item())
    assert gaps[0] > 0 and 3.5 < gaps[0] / gaps[1] < 4.5
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "g1", sha256="0" * 64)
    # Ordinary checkpoints load through the same loader.
    sha2 = save_model(parent, tmp_path / "g0")
    plain, _ = load_model(tmp_path / "g0", sha256=sha2)
    assert not isinstance(plain, LinearizedNet)


def test_exact_step_lands_on_the_batch_minimum_along_the_direction():
    parent = _parent()
    gen = GenerationSpec(name="g1", arch=parent.spec, recipe="lqf",
                         train=TrainSpec(steps=1, lr=1.0, weight_decay=0.0),
                         lqf=LQFSpec(momentum=0.0, damping=1e-2))
    recipe = make_lqf(parent, gen)
    x, y = torch.randn(32, 16), torch.randint(0, 3, (32,))
    recipe.task_loss(recipe.model(x), y).backward()
    recipe.before_step(0, x)
    step = [d.grad.clone() for d in recipe.model.delta]

    def loss_at(t: float) -> float:
        _set_delta(recipe.model, step, -t)
        with torch.no_grad():
            return recipe.task_loss(recipe.model(x), y).item()

    best = loss_at(1.0)
    assert best < loss_at(0.0) and best < loss_at(0.8) and best < loss_at(1.2)


# --- Conv2d, custom models ----------------------------------------------------------------


def test_conv2d_factors_hand_case_1x1_kernel():
    """C_in = C_out = 1, a 2x2 image [[1, 2], [3, 4]], 1x1 kernel: the 4 patches are the
    pixels. A = mean of p^2 = (1 + 4 + 9 + 16) / 4 = 7.5; with the bias column
    [[7.5, mean p], [mean p, 1]] = [[7.5, 2.5], [2.5, 1]]. g = [[1, -1], [2, 0]] at the
    4 output positions: G = sum over positions of g^2, batch mean = (1 + 1 + 4 + 0) / 1 = 6."""
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    g = torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]]])
    A, G = conv2d_factors(a, g, (1, 1), (1, 1), (0, 0), (1, 1), bias=False)
    torch.testing.assert_close(A, torch.tensor([[7.5]]))
    torch.testing.assert_close(G, torch.tensor([[6.0]]))
    A_b, _ = conv2d_factors(a, g, (1, 1), (1, 1), (0, 0), (1, 1), bias=True)
    torch.testing.assert_close(A_b, torch.tensor([[7.5, 2.5], [2.5, 1.0]]))


def test_conv2d_factors_hand_case_2x2_kernel_is_one_linear_layer():
    """A 2x2 kernel on a 2x2 image has one output position: the layer is a Linear on the
    patch p = [1, 2, 3, 4] (row-major, the weight's reshape order), A = p p^T,
    e.g. A[1, 3] = 2 * 4 = 8; g = 3 -> G = 9."""
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    g = torch.tensor([[[[3.0]]]])
    A, G = conv2d_factors(a, g, (2, 2), (1, 1), (0, 0), (1, 1), bias=False)
    p = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(A, torch.outer(p, p))
    assert A[1, 3].item() == 8.0
    torch.testing.assert_close(G, torch.tensor([[9.0]]))


def _brute_conv2d_factors(a, g, k, s, p, d, bias):
    """The patches by explicit loops over (b, i, j), in the order of weight.reshape(C_out, -1)."""
    B = a.shape[0]
    ap = torch.nn.functional.pad(a, (p[1], p[1], p[0], p[0]))
    Ho, Wo = g.shape[2:]
    patches, grads = [], []
    for b in range(B):
        for i in range(Ho):
            for j in range(Wo):
                rows = [i * s[0] + u * d[0] for u in range(k[0])]
                cols = [j * s[1] + v * d[1] for v in range(k[1])]
                patch = ap[b][:, rows][:, :, cols].reshape(-1)
                patches.append(torch.cat([patch, torch.ones(1, dtype=a.dtype)]) if bias else patch)
                grads.append(g[b, :, i, j])
    P, Gt = torch.stack(patches), torch.stack(grads)
    return P.T @ P / len(P), Gt.T @ Gt / B, torch.stack(patches)


@pytest.mark.parametrize("k,s,p,d", [((3, 3), (1, 1), (1, 1), (1, 1)), ((2, 3), (2, 1), (0, 1), (1, 1)),
                                     ((3, 2), (1, 2), (2, 0), (2, 1))])
def test_conv2d_factors_agree_with_a_brute_force_computation(k, s, p, d):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
    conv = nn.Conv2d(3, 4, k, stride=s, padding=p, dilation=d).double()
    out = conv(a)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    A, G = conv2d_factors(a, g, k, s, p, d, bias=True)
    A_want, G_want, patches = _brute_conv2d_factors(a, g, k, s, p, d, bias=True)
    torch.testing.assert_close(A, A_want)
    torch.testing.assert_close(G, G_want)
    # The patch order is the weight's: [W, b] @ [patch; 1] is the convolution's output.
    Wb = torch.cat([conv.weight.reshape(4, -1), conv.bias[:, None]], 1)
    torch.testing.assert_close((patches @ Wb.T).reshape(2, *out.shape[2:], 4).permute(0, 3, 1, 2), out)


def test_kfac_covers_every_conv2d_of_a_cnn2d():
    """cnn2d depth 2 on 8x8: stem conv, block 1 (two convs, identity skip), block 2
    (two convs and a 1x1 skip conv, it downsamples) = 6 Conv2d; + projection + cosine head."""
    torch.manual_seed(0)
    parent = build_model(ArchSpec(type="cnn2d", width=3, depth=2, embed_dim=4), (1, 8, 8), 3)
    convs = [m for m in parent.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6
    lin = LinearizedNet(parent)
    kfac = KFAC(lin, damping=1e-3)
    kinds = [type(L.module).__name__ for L in kfac.layers]
    assert kinds.count("Conv2d") == 6 and kinds[-2:] == ["Linear", "CosineHead"] and len(kinds) == 8
    x = torch.randn(8, 1, 8, 8)
    kfac.update(x)
    stem = kfac.layers[0]
    assert stem.A.shape == (1 * 9 + 1, 1 * 9 + 1) and stem.G.shape == (3, 3)
    want_A, _ = conv2d_factors(x, torch.zeros(8, 3, 8, 8), (3, 3), (1, 1), (1, 1), (1, 1), bias=True)
    torch.testing.assert_close(stem.A, want_A)  # the stem's inputs are the images themselves
    square_loss(lin(x), torch.randint(0, 3, (8,)), 4.0).backward()
    raw = [d.grad.clone() for d in lin.delta]
    kfac.precondition()
    assert not torch.allclose(raw[stem.weight], lin.delta[stem.weight].grad)


def test_kfac_skips_grouped_convs_and_padding_same():
    assert _kfac_covers(nn.Conv2d(2, 2, 3, padding=1)) and _kfac_covers(nn.Conv2d(2, 2, 3, dilation=2))
    assert not _kfac_covers(nn.Conv2d(2, 2, 3, groups=2))
    assert not _kfac_covers(nn.Conv2d(2, 2, 3, padding="same"))
    assert not _kfac_covers(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    assert not _kfac_covers(nn.Conv1d(2, 2, 3, dilation=2)) and _kfac_covers(nn.Conv1d(2, 2, 3))
    torch.manual_seed(0)
    parent = build_model(ArchSpec(type="custom", factory="tests.factories:odd_convs", embed_dim=4), (2, 5, 5), 3)
    lin = LinearizedNet(parent)
    kfac = KFAC(lin, damping=1e-3)
    covered = {n for n, m in lin.base.named_modules() if any(L.module is m for L in kfac.layers)}
    assert covered == {"trunk.plain", "project", "classifier"}
    x = torch.randn(6, 2, 5, 5)
    kfac.update(x)
    square_loss(lin(x), torch.randint(0, 3, (6,)), 4.0).backward()
    raw = {n: d.grad.clone() for n, d in zip(lin.names, lin.delta)}
    kfac.precondition()
    after = {n: d.grad for n, d in zip(lin.names, lin.delta)}
    for n in ("trunk.grouped.weight", "trunk.same.weight", "trunk.same.bias"):
        assert torch.equal(raw[n], after[n])  # plain gradient
    assert not torch.allclose(raw["trunk.plain.weight"], after["trunk.plain.weight"])


def test_kfac_factors_of_a_linear_on_sequences_treat_positions_as_a_conv_does():
    """A Linear(1, 1) without bias on (B, T, F) = (1, 2, 1) inputs a = [1, 2], output
    gradients g = [1, 3]: A = mean over positions of a^2 = (1 + 4) / 2 = 2.5, G = sum over
    positions of g^2, batch mean = (1 + 9) / 1 = 10 (as conv1d_factors would give)."""
    torch.manual_seed(0)
    parent = build_model(ArchSpec(type="custom", factory="tests.factories:sequence_linear", embed_dim=4), (2, 1), 3)
    kfac = KFAC(LinearizedNet(parent), damping=1e-3)
    L = kfac.layers[0]
    assert L.module is kfac.model.base.trunk.proj and L.bias is not None
    L.bias = None
    L.a, L.g = torch.tensor([[[1.0], [2.0]]]), torch.tensor([[[1.0], [3.0]]])
    A, G = kfac._factors(L)
    torch.testing.assert_close(A, torch.tensor([[2.5]]))
    torch.testing.assert_close(G, torch.tensor([[10.0]]))
    # Through the hooks: the first layer's inputs are the sequences themselves.
    kfac2 = KFAC(LinearizedNet(parent), damping=1e-3)
    x = torch.randn(5, 2, 1)
    kfac2.update(x)
    rows = torch.cat([x.reshape(-1, 1), torch.ones(10, 1)], 1)
    torch.testing.assert_close(kfac2.layers[0].A, rows.T @ rows / 10)


def test_lqf_trains_a_custom_model_with_its_own_heads():
    """Own embed/head (OwnHeads: Flatten, Linear, ReLU; Linear head) on a separable toy
    problem, y = [x_0 > 0]: the ReLU becomes leaky and the square loss falls."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 2, 3)).astype(np.float32)
    y = (x[:, 0, 0] > 0).astype(np.int64)
    torch.manual_seed(0)
    parent = build_model(ArchSpec(type="custom", factory="tests.factories:own_heads", kwargs={"dim": 8}), (2, 3), 2)
    gen = GenerationSpec(name="g1", arch=parent.spec, recipe="lqf",
                         train=TrainSpec(steps=30, batch_size=32, lr=0.1),
                         lqf=LQFSpec(target_scale=4.0, damping=1e-2, update_interval=5))
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    start = LinearizedNet(parent)
    assert not any(type(m) is nn.ReLU for m in start.base.modules())
    assert [type(L.module).__name__ for L in KFAC(start, 1e-3).layers] == ["Linear", "Linear"]
    with torch.no_grad():
        before = square_loss(start(xt), yt, 4.0).item()
    lin = fit_lqf(parent, Split(x, y), gen)
    with torch.no_grad():
        after = square_loss(lin(xt), yt, 4.0).item()
        accuracy = (lin(xt).argmax(1) == yt).float().mean().item()
    assert after < 0.5 * before and accuracy > 0.8
