"""scikit-learn's handwritten digits as (N, 1, 8, 8) images: the data factory of this
example, `digits_images:load`. graceful splits (x, y) by its seed."""

from __future__ import annotations

import numpy as np


def load(scale: float = 16.0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / scale)[:, None, :, :]
    return x, d.target.astype(np.int64)
