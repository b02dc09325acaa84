"""User-style model and data factories for tests, referenced by import path
(`tests.factories:backbone`), exactly as a user's package would be."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


# --- models ---------------------------------------------------------------------------------

class TinyBackbone(nn.Module):
    """A backbone without embed/head: (N, C, H, W) -> (N, F) features."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def backbone(input_shape, num_classes, width: int = 4) -> nn.Module:
    return TinyBackbone(int(input_shape[0]), width)


class OwnHeads(nn.Module):
    """A model with its own embed(x) and head(z) (a method over a private Linear)."""

    def __init__(self, input_shape, num_classes: int, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), dim), nn.ReLU())
        self.cls = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.cls(z)


def own_heads(input_shape, num_classes, dim: int = 16) -> nn.Module:
    return OwnHeads(input_shape, num_classes, dim)


def not_a_module(input_shape, num_classes):
    return "a string"


def sequence_output(input_shape, num_classes):
    """Returns (N, C, 4) instead of (N, F): refused with a clear error."""
    return nn.Conv1d(int(input_shape[0]), 3, 1) if len(input_shape) == 2 else nn.Identity()


def failing(input_shape, num_classes):
    raise RuntimeError("no weights for you")


# --- data -----------------------------------------------------------------------------------

def digits_images():
    """scikit-learn digits as (N, 1, 8, 8) float images and int labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    return x, d.target.astype(np.int64)


def digits_splits():
    """The same images, split by the factory itself."""
    x, y = digits_images()
    return {"train": (x[:1200], y[:1200]), "val": (x[1200:1400], y[1200:1400]), "test": (x[1400:], y[1400:])}


def first_classes(classes: int = 5):
    """Digits images of classes < `classes` only (an older generation's world)."""
    x, y = digits_images()
    keep = y < classes
    return x[keep], y[keep]


def with_nan():
    x, y = digits_images()
    x[3, 0, 0, 0] = np.nan
    return x, y


def float_labels():
    x, y = digits_images()
    return x, y.astype(np.float64)


def short_labels():
    x, y = digits_images()
    return x, y[:-1]


def strings():
    return np.array([["a", "b"]] * 10), np.zeros(10, dtype=np.int64)


def not_arrays():
    return 42
