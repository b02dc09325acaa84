"""Generations hosted inside the router process (`serving.in_router_models`).

For small models the deployment-handle hop costs more than the model itself (about a
third of the throughput on 2 cores: docs/serving.md, Overhead benchmark). A `LocalGeneration` has
the call surface of a deployment handle (`.predict.remote(x)` is awaitable), so the
router treats local and remote generations alike. Inference runs on the router's event
loop: only for models that answer in well under a millisecond.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Callable, Optional

import numpy as np
import torch

from serving.refs import ModelRef
from workers.checkpoint import load_model


def infer(fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, device: Optional[torch.device] = None
          ) -> np.ndarray:
    """Run `fn` without autograd on a (rows, *input_shape) float32 array, on `device`
    (the model's: CPU unless a GPU replica moved it); the answer comes back to the host."""
    with torch.inference_mode():
        t = torch.from_numpy(x)
        return fn(t if device is None else t.to(device)).cpu().numpy()


def serving_device(gpus: float) -> torch.device:
    """Where a model replica given `gpus` GPUs (serving.gpus_per_replica) runs its model:
    CUDA when it was given any, else the CPU. A GPU replica without a visible CUDA device
    is a deployment error, said at start, not a silent fall back to the CPU."""
    if gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"serving.gpus_per_replica is {gpus:g} but this replica sees no CUDA device "
                           f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); set it to 0 to serve on CPUs")
    return torch.device("cuda")


def probabilities(model) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: torch.softmax(model(t), dim=-1)


def describe(ref: ModelRef, model) -> dict[str, Any]:
    """What a generation serves: name, sha256, input shape (and its legacy `input_dim`,
    the values per row), classes."""
    return {"name": ref.name, "sha256": ref.sha256, "input_shape": list(model.input_shape),
            "input_dim": model.input_dim, "num_classes": model.num_classes}


def warm_up(model, device: Optional[torch.device] = None) -> None:
    """Run predict and embed once on a zero row, of shape (1, *model.input_shape), before
    the first request: a model's first call can cost ~1 s (an LQF model's first jvp),
    which would otherwise land on live traffic as shadow timeouts and count against the
    candidate."""
    x = np.zeros((1, *model.input_shape), dtype=np.float32)
    infer(probabilities(model), x, device)
    infer(model.embed, x, device)


class _Method:
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self._fn = fn

    def remote(self, x: np.ndarray) -> "asyncio.Future[np.ndarray]":
        fut = asyncio.get_running_loop().create_future()
        try:
            fut.set_result(infer(self._fn, x))
        except Exception as e:  # surfaces like a failed handle call
            fut.set_exception(e)
        return fut


class LocalGeneration:
    """A verified checkpoint loaded in the router (sha256, and the factory when `ref`
    names one, checked by load_model)."""

    def __init__(self, ref: ModelRef):
        torch.set_num_threads(1)
        self.ref = ref
        self.model, _ = load_model(ref.uri, ref.sha256, factory=ref.factory)
        warm_up(self.model)
        self.predict = _Method(probabilities(self.model))
        self.embed = _Method(self.model.embed)

    def describe(self) -> dict[str, Any]:
        return describe(self.ref, self.model)
