"""Model architectures built from config: an embedding network plus a classifier head.

Compatibility training needs the two apart: BCT feeds the new embedding through the old
head, retrieval compares embeddings. By default the embedding is L2-normalised and the head
is a cosine classifier, because with a ReLU embedding and a linear head backward-compatible
training fails (docs/training.md: M(g1, g0) 36 vs 93).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn import functional as F

from workers.specs import ArchSpec


class CosineHead(nn.Module):
    """Normalised softmax head: logits = scale * cos(embedding, class weight). No bias.

    No bias on purpose: DDP fails on parameters that take no part in the loss.
    """

    def __init__(self, embed_dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim) * embed_dim ** -0.5)
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(z, dim=-1) @ F.normalize(self.weight, dim=-1).T


Shape = tuple[int, ...]


def _activation(spec: ArchSpec) -> nn.Module:
    if spec.activation == "leaky_relu":
        return nn.LeakyReLU(spec.negative_slope)
    return nn.ReLU()


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _mlp_trunk(spec: ArchSpec, input_shape: Shape) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]  # any input shape: rows are flattened
    dim = _numel(input_shape)
    for _ in range(spec.depth):
        layers += [nn.Linear(dim, spec.width), _activation(spec)]
        dim = spec.width
    return nn.Sequential(*layers)


class _Unsqueeze(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


def _cnn1d_trunk(spec: ArchSpec, input_shape: Shape) -> nn.Module:
    if len(input_shape) not in (1, 2):
        raise ValueError(f"cnn1d takes inputs of shape (L,) or (C, L), got {input_shape}; "
                         f"use cnn2d for images or mlp for anything else")
    layers: list[nn.Module] = [_Unsqueeze()] if len(input_shape) == 1 else []
    channels = 1 if len(input_shape) == 1 else int(input_shape[0])
    for _ in range(spec.depth):
        layers += [
            nn.Conv1d(channels, spec.width, spec.kernel_size, stride=2, padding=spec.kernel_size // 2),
            _activation(spec),
        ]
        channels = spec.width
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """act(x' + conv(act(conv(x)))): two 3x3 convolutions and a skip connection (a 1x1
    convolution when the block downsamples). No batch norm: its batch statistics make a
    model's output depend on the other rows of a batch, which neither live flips nor the
    linearisation of `recipe: lqf` can have."""

    def __init__(self, channels_in: int, channels: int, stride: int, spec: ArchSpec):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride=stride, padding=1)
        self.act1 = _activation(spec)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.skip = (nn.Identity() if stride == 1 and channels_in == channels
                     else nn.Conv2d(channels_in, channels, 1, stride=stride))
        self.act2 = _activation(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.skip(x) + self.conv2(self.act1(self.conv1(x))))


def _cnn2d_trunk(spec: ArchSpec, input_shape: Shape) -> nn.Module:
    """A small ResNet: a 3x3 stem, `depth` residual blocks (each after the first halves the
    resolution while it stays >= 2), global average pooling -> `width` features."""
    if len(input_shape) not in (2, 3):
        raise ValueError(f"cnn2d takes images of shape (H, W) or (C, H, W), got {input_shape}")
    layers: list[nn.Module] = [_Unsqueeze()] if len(input_shape) == 2 else []
    channels = 1 if len(input_shape) == 2 else int(input_shape[0])
    size = min(int(d) for d in input_shape[-2:])
    layers += [nn.Conv2d(channels, spec.width, 3, padding=1), _activation(spec)]
    for i in range(spec.depth):
        stride = 2 if i > 0 and size >= 4 else 1
        size = (size + 1) // stride if stride == 2 else size
        layers.append(ResidualBlock(spec.width, spec.width, stride, spec))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


_TRUNKS = {"mlp": _mlp_trunk, "cnn1d": _cnn1d_trunk, "cnn2d": _cnn2d_trunk}


@torch.no_grad()
def _dry_run(fn, module: nn.Module, input_shape: Shape) -> torch.Tensor:
    """`fn` on a zero batch of 2 rows (2: a batch norm in train mode refuses 1), eval mode."""
    was = module.training
    module.eval()
    try:
        return fn(torch.zeros(2, *input_shape))
    finally:
        module.train(was)


class GracefulNet(nn.Module):
    """Embedding network + head. `embed(x)` -> (B, D), `head(z)` -> logits, `forward` = both.

    The trunk is a built-in one (`arch.type` mlp, cnn1d, cnn2d) or the module of a custom
    factory that has no `embed`/`head` of its own: its output (B, F) is taken as features,
    and graceful adds the projection to `embed_dim` and the head.
    """

    def __init__(self, spec: ArchSpec, input_shape: Shape, num_classes: int, trunk: Optional[nn.Module] = None):
        super().__init__()
        self.spec = spec
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = num_classes
        self.trunk = trunk if trunk is not None else _TRUNKS[spec.type](spec, self.input_shape)
        what = f"arch.factory {spec.factory}: the backbone" if spec.factory else f"the {spec.type} network"
        try:
            out = _dry_run(self.trunk, self.trunk, self.input_shape)
        except Exception as e:
            raise ValueError(f"{what} fails on inputs of shape {self.input_shape}: "
                             f"{type(e).__name__}: {e}") from None
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{what} must map (N, *input_shape) to features (N, F), "
                             f"got {got} (or give the module embed(x) and head(z))")
        self.project = nn.Linear(int(out.shape[1]), spec.embed_dim)
        if spec.head == "cosine":
            self.classifier: nn.Module = CosineHead(spec.embed_dim, num_classes, spec.scale)
            self._post = nn.Identity()
        else:
            self.classifier = nn.Linear(spec.embed_dim, num_classes)
            self._post = _activation(spec)

    @property
    def input_dim(self) -> int:
        """Values per row (the product of `input_shape`)."""
        return _numel(self.input_shape)

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def unit_embeddings(self) -> bool:
        """Whether `embed` returns unit vectors (cosine head): BCT then skips normalising."""
        return self.spec.head == "cosine"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before its L2 normalisation (what LQF linearises)."""
        return self._post(self.project(self.trunk(x)))

    def finish_embedding(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1) if self.unit_embeddings else z

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding used for retrieval (unit length with the cosine head)."""
        return self.finish_embedding(self.features(x))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def embed_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(x)
        return z, self.head(z)


class _BoundHead(nn.Module):
    """A model's `head(z)` as a module (when the head is a method, not a submodule)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net.head(z)


class UserNet(nn.Module):
    """A custom factory's module that has `embed(x) -> (N, D)` and `head(z) -> (N, C)`: used
    as it is, with the interface of `GracefulNet` around it. Its embedding is not
    normalised by graceful (the user's `embed` decides)."""

    def __init__(self, spec: ArchSpec, input_shape: Shape, num_classes: int, net: nn.Module):
        super().__init__()
        self.spec = spec
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = num_classes
        self.net = net
        try:
            z = _dry_run(net.embed, net, self.input_shape)
            logits = _dry_run(lambda x: net.head(net.embed(x)), net, self.input_shape)
        except Exception as e:
            raise ValueError(f"arch.factory {spec.factory}: embed/head fail on inputs of shape "
                             f"{self.input_shape}: {type(e).__name__}: {e}") from None
        if not isinstance(z, torch.Tensor) or z.ndim != 2:
            raise ValueError(f"arch.factory {spec.factory}: embed(x) must return (N, D), got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
            raise ValueError(f"arch.factory {spec.factory}: head(z) must return (N, {num_classes}) logits, got "
                             f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
        self._embed_dim = int(z.shape[1])

    input_dim = GracefulNet.input_dim
    unit_embeddings = False

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)

    def finish_embedding(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.net.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def embed_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(x)
        return z, self.head(z)

    @property
    def classifier(self) -> nn.Module:
        """The head as a module: the submodule `head` if it is one, else `head(z)` bound."""
        head = getattr(self.net, "head", None)
        return head if isinstance(head, nn.Module) else _BoundHead(self.net)


def _has_embed_and_head(module: nn.Module) -> bool:
    return callable(getattr(module, "embed", None)) and callable(getattr(module, "head", None))


def build_model(spec: ArchSpec, input_shape: "Shape | int", num_classes: int) -> "GracefulNet | UserNet":
    """Build the network a generation's `arch` describes, for rows of `input_shape`.

    custom: `factory(input_shape, num_classes, **kwargs)` from its import path; a module
    with `embed` and `head` is used as it is (`UserNet`), any other one is the backbone of
    a `GracefulNet` (projection to `embed_dim` and the configured head added).
    ValueError (FactoryError for the factory itself) naming what is wrong.
    """
    shape = (int(input_shape),) if isinstance(input_shape, int) else tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape) or num_classes <= 1:
        raise ValueError(f"need an input shape of positive sizes and num_classes > 1, got {shape}, {num_classes}")
    if spec.type != "custom":
        return GracefulNet(spec, shape, num_classes)
    from workers.factory import FactoryError, load_callable

    factory = load_callable(spec.factory or "", "arch.factory")
    try:
        module = factory(shape, num_classes, **spec.kwargs)
    except Exception as e:
        raise FactoryError(f"arch.factory {spec.factory}({shape}, {num_classes}, **{spec.kwargs}) failed: "
                           f"{type(e).__name__}: {e}") from None
    if not isinstance(module, nn.Module):
        raise FactoryError(f"arch.factory {spec.factory} returned a {type(module).__name__}, not a torch.nn.Module")
    if _has_embed_and_head(module):
        return UserNet(spec, shape, num_classes, module)
    return GracefulNet(spec, shape, num_classes, trunk=module)


# --- the linearised network of `recipe: lqf` (trained by workers.lqf) ---------------------

_ARCH_MUST_MATCH = ("type", "factory", "kwargs", "width", "depth", "kernel_size", "embed_dim", "head", "scale")


def lqf_arch(parent_arch: ArchSpec, arch: Optional[ArchSpec] = None) -> ArchSpec:
    """The architecture an LQF generation trains: the parent's, with leaky ReLU.

    `arch` (the generation's own arch) must describe the same network as the parent's --
    linearisation cannot change shapes -- and only contributes the leaky slope.
    """
    arch = arch or parent_arch
    diff = [k for k in _ARCH_MUST_MATCH if getattr(arch, k) != getattr(parent_arch, k)]
    if diff:
        raise ValueError(f"recipe lqf fine-tunes the parent's network; arch differs in {diff}")
    return parent_arch.model_copy(update={"activation": "leaky_relu", "negative_slope": arch.negative_slope})


def leaky_relus(module: nn.Module, slope: float) -> int:
    """Replace every `nn.ReLU` submodule of `module` by `nn.LeakyReLU(slope)`, in place;
    returns how many. A custom network's ReLUs must leak for LQF (a ReLU's Jacobian is zero
    wherever a unit is off at w0); a `torch.nn.functional.relu` call cannot be replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.ReLU:
            setattr(module, name, nn.LeakyReLU(slope))
            count += 1
        else:
            count += leaky_relus(child, slope)
    return count


class _EmbedAndLogits(nn.Module):
    """`functional_call` calls `forward`; this makes `forward` return both outputs."""

    def __init__(self, net: "GracefulNet | UserNet"):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.net.features(x)
        return z, self.net.head(self.net.finish_embedding(z))


class _HeadOf(_EmbedAndLogits):
    """`forward(z)` = the net's head, so `functional_call` can apply it with other weights."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.net.head(z)


class LinearizedNet(nn.Module):
    """f(x; w0) + J(x; w0) delta, with the interface of `GracefulNet`.

    `base` holds w0 (frozen; a built-in or a custom network, its ReLUs made leaky);
    `delta` (one tensor per parameter of `base`, zero at start) is what trains.
    `embed_and_logits` linearises the pre-normalisation embedding and the logits jointly in
    one JVP; the embedding is then L2-normalised for a cosine head (as `GracefulNet.embed`
    is), which retrieval does anyway. `head(z)` applies the head with folded weights
    w0 + delta: exact for a linear head (its logits are bilinear, the second-order term
    aside) and what BCT needs when this model later serves as an old one.
    """

    def __init__(self, parent: "GracefulNet | UserNet", arch: Optional[ArchSpec] = None):
        super().__init__()
        self.spec = lqf_arch(parent.spec, arch)
        self.input_shape, self.num_classes = parent.input_shape, parent.num_classes
        self.base = build_model(self.spec, self.input_shape, self.num_classes)
        self.base.load_state_dict(parent.state_dict())
        leaky_relus(self.base, self.spec.negative_slope)
        self.base.requires_grad_(False)
        self.names = [n for n, _ in self.base.named_parameters()]
        self.delta = nn.ParameterList([nn.Parameter(torch.zeros_like(p)) for p in self.base.parameters()])
        # Not registered submodules: they share `base` and must not duplicate its state.
        object.__setattr__(self, "_both", _EmbedAndLogits(self.base))
        object.__setattr__(self, "_head", _HeadOf(self.base))

    input_dim = GracefulNet.input_dim

    @property
    def embed_dim(self) -> int:
        return self.base.embed_dim

    @property
    def unit_embeddings(self) -> bool:
        return self.base.unit_embeddings

    def _primals(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.detach() for p in self.base.parameters())

    def _jvp(self, x: torch.Tensor, tangents: tuple[torch.Tensor, ...]):
        """((z0, logits0), (dz, dlogits)): outputs at w0 and their derivative along `tangents`."""

        def f(*params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return functional_call(self._both, {f"net.{n}": p for n, p in zip(self.names, params)}, (x,))

        return jvp(f, self._primals(), tangents)

    def _raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-normalisation embedding, logits), both linearised."""
        (z0, l0), (dz, dl) = self._jvp(x, tuple(self.delta))
        return z0 + dz, l0 + dl

    @torch.no_grad()
    def curvature_along(self, x: torch.Tensor, direction: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """d^T (J^T J / B) d on batch `x`: the square loss's exact curvature along `direction`
        (exact because the model is linear in delta), from one forward-mode pass."""
        dl = self._jvp(x, direction)[1][1]
        return dl.pow(2).sum() / x.shape[0]

    def embed_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, logits = self._raw(x)
        return self.base.finish_embedding(z), logits

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_and_logits(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._raw(x)[1]

    def folded_state(self) -> dict[str, torch.Tensor]:
        """w0 + delta for every parameter of `base` (buffers left as they are)."""
        return {n: self.base.get_parameter(n) + d for n, d in zip(self.names, self.delta)}

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return functional_call(self._head, {f"net.{n}": p for n, p in self.folded_state().items()}, (z,))

    @property
    def classifier(self) -> nn.Module:
        """The head as a module with folded weights w0 + delta (a detached copy, the same
        thing `head` computes): what `workers.losses.frozen_head` freezes when this model is
        a BCT constraint. For a cosine head it is a `CosineHead` with the parent's scale."""
        folded = copy.deepcopy(self.base)
        with torch.no_grad():
            folded.load_state_dict(self.folded_state(), strict=False)
        return folded.classifier.requires_grad_(False).eval()
