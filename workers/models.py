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


def _activation(spec: ArchSpec) -> nn.Module:
    if spec.activation == "leaky_relu":
        return nn.LeakyReLU(spec.negative_slope)
    return nn.ReLU()


def _mlp_trunk(spec: ArchSpec, input_dim: int) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    dim = input_dim
    for _ in range(spec.depth):
        layers += [nn.Linear(dim, spec.width), _activation(spec)]
        dim = spec.width
    return nn.Sequential(*layers), dim


class _Unsqueeze(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


def _cnn_trunk(spec: ArchSpec, input_dim: int) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = [_Unsqueeze()]
    channels = 1
    for _ in range(spec.depth):
        layers += [
            nn.Conv1d(channels, spec.width, spec.kernel_size, stride=2, padding=spec.kernel_size // 2),
            _activation(spec),
        ]
        channels = spec.width
    layers.append(nn.Flatten())
    trunk = nn.Sequential(*layers)
    with torch.no_grad():
        out_dim = trunk(torch.zeros(1, input_dim)).shape[1]
    return trunk, int(out_dim)


class GracefulNet(nn.Module):
    """Embedding network + head. `embed(x)` -> (B, D), `head(z)` -> logits, `forward` = both."""

    def __init__(self, spec: ArchSpec, input_dim: int, num_classes: int):
        super().__init__()
        self.spec = spec
        self.input_dim = input_dim
        self.num_classes = num_classes
        trunk, feat_dim = (_mlp_trunk if spec.type == "mlp" else _cnn_trunk)(spec, input_dim)
        self.trunk = trunk
        self.project = nn.Linear(feat_dim, spec.embed_dim)
        if spec.head == "cosine":
            self.classifier: nn.Module = CosineHead(spec.embed_dim, num_classes, spec.scale)
            self._post = nn.Identity()
        else:
            self.classifier = nn.Linear(spec.embed_dim, num_classes)
            self._post = _activation(spec)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding used for retrieval (unit length with the cosine head)."""
        z = self._post(self.project(self.trunk(x)))
        return F.normalize(z, dim=-1) if self.spec.head == "cosine" else z

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def embed_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(x)
        return z, self.head(z)


def build_model(spec: ArchSpec, input_dim: int, num_classes: int) -> GracefulNet:
    """Build the network a generation's `arch` describes."""
    if input_dim <= 0 or num_classes <= 1:
        raise ValueError(f"need input_dim > 0 and num_classes > 1, got {input_dim}, {num_classes}")
    return GracefulNet(spec, input_dim, num_classes)


# --- the linearised network of `recipe: lqf` (trained by workers.lqf) ---------------------

_ARCH_MUST_MATCH = ("type", "width", "depth", "kernel_size", "embed_dim", "head", "scale")


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


class _EmbedAndLogits(nn.Module):
    """`functional_call` calls `forward`; this makes `forward` return both outputs."""

    def __init__(self, net: GracefulNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.net._post(self.net.project(self.net.trunk(x)))
        return z, self.net.head(F.normalize(z, dim=-1) if self.net.spec.head == "cosine" else z)


class LinearizedNet(nn.Module):
    """f(x; w0) + J(x; w0) delta, with the interface of `GracefulNet`.

    `base` holds w0 (frozen); `delta` (one tensor per parameter of `base`, zero at start)
    is what trains. `embed_and_logits` linearises the pre-normalisation embedding and the
    logits jointly in one JVP; the embedding is then L2-normalised for a cosine head (as
    `GracefulNet.embed` is), which retrieval does anyway. `head(z)` applies the head with
    folded weights w0 + delta: exact for a linear head (its logits are bilinear, the
    second-order term aside) and what BCT needs when this model later serves as an old one.
    """

    def __init__(self, parent: GracefulNet, arch: Optional[ArchSpec] = None):
        super().__init__()
        self.spec = lqf_arch(parent.spec, arch)
        self.input_dim, self.num_classes = parent.input_dim, parent.num_classes
        self.base = build_model(self.spec, self.input_dim, self.num_classes)
        self.base.load_state_dict(parent.state_dict())
        self.base.requires_grad_(False)
        self.names = [n for n, _ in self.base.named_parameters()]
        self.delta = nn.ParameterList([nn.Parameter(torch.zeros_like(p)) for p in self.base.parameters()])
        # Not a registered submodule: it shares `base` and must not duplicate its state.
        object.__setattr__(self, "_both", _EmbedAndLogits(self.base))

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
        return (F.normalize(z, dim=-1) if self.spec.head == "cosine" else z), logits

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_and_logits(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._raw(x)[1]

    def head(self, z: torch.Tensor) -> torch.Tensor:
        head_names = [n for n in self.names if n.startswith("classifier.")]
        params = {n[len("classifier."):]: self._param(n) for n in head_names}
        return functional_call(self.base.classifier, params, (z,))

    def _param(self, name: str) -> torch.Tensor:
        i = self.names.index(name)
        return self.base.get_parameter(name) + self.delta[i]

    @property
    def classifier(self) -> nn.Module:
        """The head as a module with folded weights w0 + delta (a detached copy, the same
        thing `head` computes): what `workers.losses.frozen_head` freezes when this model is
        a BCT constraint. For a cosine head it is a `CosineHead` with the parent's scale."""
        head = copy.deepcopy(self.base.classifier)
        with torch.no_grad():
            for n, p in head.named_parameters():
                p.copy_(self._param(f"classifier.{n}"))
        return head.requires_grad_(False).eval()
