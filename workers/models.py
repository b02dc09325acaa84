"""Model architectures built from config: an embedding network plus a classifier head.

Compatibility training needs the two apart: BCT feeds the new embedding through the old
head, retrieval compares embeddings. By default the embedding is L2-normalised and the head
is a cosine classifier, because with a ReLU embedding and a linear head backward-compatible
training fails (docs/training.md: M(g1, g0) 36 vs 93).
"""

from __future__ import annotations

import torch
from torch import nn
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
