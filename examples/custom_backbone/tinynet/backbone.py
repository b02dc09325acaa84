"""`tinynet.backbone:build`: a convolutional backbone whose output (N, F) graceful takes as
features, adding the projection to arch.embed_dim and the head itself."""

from __future__ import annotations

from torch import nn


def build(input_shape, num_classes, channels: int = 8) -> nn.Module:
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),  # (N, 8 * channels) features
    )
