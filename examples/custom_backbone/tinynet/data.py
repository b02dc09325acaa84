"""`tinynet.data:load`: a generated set of 12x12 one-channel images of four shapes (a
horizontal bar, a vertical bar, a diagonal, a square) at random places, with noise; the
factory returns its own train/val/test splits. Deterministic by `seed`."""

from __future__ import annotations

import numpy as np

SIZE = 12


def _shape(kind: int, rng: np.random.Generator) -> np.ndarray:
    img = np.zeros((SIZE, SIZE), np.float32)
    r, c = rng.integers(1, SIZE - 5, 2)
    if kind == 0:
        img[r + 2, c:c + 5] = 1
    elif kind == 1:
        img[r:r + 5, c + 2] = 1
    elif kind == 2:
        for i in range(5):
            img[r + i, c + i] = 1
    else:
        img[r:r + 4, c] = img[r:r + 4, c + 3] = img[r, c:c + 4] = img[r + 3, c:c + 4] = 1
    return img


def load(samples: int = 2000, noise: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, samples).astype(np.int64)
    x = np.stack([_shape(int(k), rng) for k in y])[:, None]
    x += noise * rng.standard_normal(x.shape).astype(np.float32)
    a, b = int(samples * 0.7), int(samples * 0.8)
    return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}
