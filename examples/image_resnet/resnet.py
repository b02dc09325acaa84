"""A small residual Conv2d network with its own `embed` and `head` (graceful uses them as
they are): the model factory of this example, `resnet:build`."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    """relu(skip(x) + conv(relu(conv(x)))); `stride` 2 halves the resolution."""

    def __init__(self, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.skip = nn.Identity() if stride == 1 else nn.Conv2d(channels, channels, 1, stride=stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.skip(x) + self.conv2(self.relu1(self.conv1(x))))


class ResNet(nn.Module):
    """Stem, residual blocks, average pooling, a projection to `embed_dim`; the embedding
    is L2-normalised and the head is a cosine classifier, which backward-compatible
    training needs."""

    def __init__(self, channels: int, num_classes: int, width: int, blocks: int, embed_dim: int, scale: float):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(width, stride=1 if i == 0 else 2) for i in range(blocks)])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project = nn.Linear(width, embed_dim)
        self.classes = nn.Parameter(torch.randn(num_classes, embed_dim) * embed_dim ** -0.5)
        self.scale = scale

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(self.pool(self.blocks(self.stem(x)))), dim=-1)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * z @ F.normalize(self.classes, dim=-1).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def build(input_shape, num_classes, width: int = 16, blocks: int = 2, embed_dim: int = 32,
          scale: float = 16.0) -> nn.Module:
    """graceful's model contract: factory(input_shape, num_classes, **kwargs) -> nn.Module."""
    channels, height, width_px = input_shape
    return ResNet(channels, num_classes, width, blocks, embed_dim, scale)
