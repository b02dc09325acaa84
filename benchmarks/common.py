"""Helpers shared by the training benchmarks (nfr_pareto, compat_retrieval, train_overhead).

The models are trained with the single-process `workers.training.fit` and the very loss
the Ray Train workers add (`workers.train.make_extra_loss` over cached old outputs): the
benchmarks measure the methods, not the distribution, and stay inside ~10 minutes on 2
cores. Independent reference trainings (the ensemble) run as Ray tasks, 2 at a time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from workers.data import Dataset, Split, load_dataset
from workers.models import GracefulNet, build_model
from workers.specs import ArchSpec, CompatSpec, DataSpec, TrainSpec
from workers.train import CompatTargets, make_extra_loss
from workers.training import fit

RESULTS = Path(__file__).resolve().parent / "results"


def cnn(width: int, embed_dim: int = 64) -> ArchSpec:
    """The notes' 1D CNN: L2-normalised embedding, cosine head with scale 16."""
    return ArchSpec(type="cnn1d", width=width, depth=3, embed_dim=embed_dim, head="cosine", scale=16.0)


def mnist1d(num_samples: int, test_fraction: float, val_fraction: float = 0.02) -> Dataset:
    return load_dataset(DataSpec(source="mnist1d", num_samples=num_samples, seed=0,
                                 test_fraction=test_fraction, val_fraction=val_fraction))


def train(arch: ArchSpec, data: Split, input_dim: int, num_classes: int, spec: TrainSpec,
          compat: Optional[CompatSpec] = None, targets: Optional[CompatTargets] = None
          ) -> tuple[GracefulNet, float]:
    """(trained model, seconds): `fit` with the Ray Train loop's compatibility terms."""
    torch.manual_seed(spec.seed)
    model = build_model(arch, input_dim, num_classes)
    extra = make_extra_loss(compat, targets) if compat is not None and targets is not None else None
    t0 = time.perf_counter()
    fit(model, data, spec, extra_loss=extra)
    return model, time.perf_counter() - t0


def ray_map(fn: Callable[..., Any], arg_tuples: Sequence[tuple], parallel: int = 2) -> list[Any]:
    """fn(*args) for each tuple as Ray tasks with 1 CPU each, `parallel` at a time (a local
    Ray with that many CPUs is started if none is running)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=parallel, include_dashboard=False, configure_logging=False, log_to_driver=False)
    task = ray.remote(num_cpus=1)(fn)
    return ray.get([task.remote(*a) for a in arg_tuples])


def mean_std(values: Iterable[float], scale: float = 100.0, digits: int = 2) -> str:
    v = scale * np.asarray(list(values), dtype=float)
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def merge_rows(path: Path, rows: list[dict], key: Callable[[dict], tuple]) -> list[dict]:
    """Rows stored in `path`, those with the same key replaced by `rows` (so a long
    benchmark can run in parts, e.g. one seed per process)."""
    old = json.loads(path.read_text()) if path.is_file() else []
    keys = {key(r) for r in rows}
    return [r for r in old if key(r) not in keys] + rows


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")
    print(f"wrote {path}")


def axes(ncols: int, figsize: tuple[float, float]):
    """(fig, axes) of a headless matplotlib figure with `ncols` panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
    return fig, ax[0]


def save_png(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def seeds_parser(doc: str, seeds: list[int]) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=seeds,
                    help="seeds to run now; rows of other seeds already in the JSON are kept")
    return ap
