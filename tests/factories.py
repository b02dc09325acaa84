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


# --- added for the unit tests of models, losses and LQF --------------------------------------

class ScaledIdentityHead(nn.Module):
    """embed(x) = a Linear of the flattened rows to `num_classes` values; head(z) = scale * z,
    a method without parameters: logits are known by hand for any z."""

    def __init__(self, input_shape, num_classes: int, scale: float):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))
        self.scale = scale

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * z


def scaled_identity_head(input_shape, num_classes, scale: float = 2.0) -> nn.Module:
    return ScaledIdentityHead(input_shape, num_classes, scale)


class SubmoduleHead(nn.Module):
    """embed(x) a method, `head` an nn.Linear submodule."""

    def __init__(self, input_shape, num_classes: int, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), dim))
        self.head = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def submodule_head(input_shape, num_classes, dim: int = 5) -> nn.Module:
    return SubmoduleHead(input_shape, num_classes, dim)


def wrong_head_classes(input_shape, num_classes):
    """A head with one class too many: refused."""
    return SubmoduleHead(input_shape, num_classes + 1, 4)


def wrong_input_channels(input_shape, num_classes):
    """A backbone expecting one channel more than the data has: fails on the dry run."""
    return TinyBackbone(int(input_shape[0]) + 1, 2)


class OddConvs(nn.Module):
    """Convolutions K-FAC does not cover (grouped, padding='same') beside one it does."""

    def __init__(self, channels: int):
        super().__init__()
        self.plain = nn.Conv2d(channels, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.same = nn.Conv2d(4, 4, 3, padding="same")
        self.pool = nn.Sequential(nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.same(self.grouped(self.plain(x))))


def odd_convs(input_shape, num_classes) -> nn.Module:
    return OddConvs(int(input_shape[0]))


class SequenceLinear(nn.Module):
    """(N, T, F) -> a Linear on every position -> mean over T: (N, H) features."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(features, hidden)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(x)).mean(dim=1)


def sequence_linear(input_shape, num_classes, hidden: int = 3) -> nn.Module:
    return SequenceLinear(int(input_shape[-1]), hidden)


# --- added for the unit tests of data -----------------------------------------------------

def negative_labels():
    x, y = digits_images()
    y = y.copy()
    y[5] = -1
    return x, y


def splits_without_test():
    x, y = digits_images()
    return {"train": (x[:1200], y[:1200]), "val": (x[1200:], y[1200:])}


def split_not_a_pair():
    x, y = digits_images()
    return {"train": (x[:1200], y[:1200]), "test": x[1200:]}


def splits_of_other_shapes():
    x, y = digits_images()
    return {"train": (x[:1200], y[:1200]), "test": (x[1200:, :, :4, :], y[1200:])}


def torch_tensors():
    """x and y as torch tensors (accepted and converted)."""
    x, y = digits_images()
    return torch.as_tensor(x), torch.as_tensor(y)


def tiny_flat(n: int = 40, classes: int = 3, features: int = 5):
    """n rows of `features` values, labels 0..classes-1 in turn (deterministic)."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, features)).astype(np.float32), np.arange(n) % classes


# --- catalogue items ------------------------------------------------------------------------

def catalogue_items(n: int = 12, dim: int = 64, seed: int = 0) -> dict:
    """Items a user's catalogue factory would return: string ids, inputs, labels."""
    rng = np.random.default_rng(seed)
    return {"ids": [f"sku-{i:05d}" for i in range(n)], "x": rng.random((n, dim)).astype(np.float32),
            "y": np.arange(n) % 3}


def catalogue_items_bad_shape() -> tuple:
    return ["a", "b"], np.zeros((3, 64), np.float32)
