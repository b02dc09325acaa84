"""LQF vs standard fine-tuning of generation 1 from generation 0 on MNIST-1D (issue 11).

Generation 0 (1D CNN, leaky ReLU) trains on the first `--g0-fraction` of the training pool;
generation 1 starts from it and sees the whole pool, by one of:

  finetune        the non-linear network, cross-entropy, AdamW (training.fit)
  lqf             the linearisation around g0, square loss, K-FAC-preconditioned SGD
  lqf_no_precond  the same without the preconditioner (ablation)

and each again with Focal Distillation from g0 (`_fd`). Error and NFR (vs g0) on a test
set of 10,000; rows {"method", "seed", "error", "nfr", "train_seconds"} are merged into
benchmarks/results/lqf.json (by method and seed, so seeds can run in separate processes).

    flock /tmp/graceful-cpu.lock timeout 480 python -m benchmarks.lqf --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn import functional as F

from orchestrator.evaluation.metrics import error_rate, nfr
from workers.data import Dataset, generation_train_split, load_dataset
from workers.lqf import fit_lqf
from workers.models import GracefulNet, build_model
from workers.specs import ArchSpec, DataSpec, GenerationSpec, LQFSpec, TrainSpec
from workers.training import fit, predict

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["finetune", "lqf", "lqf_no_precond", "finetune_fd", "lqf_fd", "lqf_no_precond_fd"]


def _focal_distillation(old_logits: torch.Tensor, old_right: torch.Tensor, alpha: float, beta: float,
                        temperature: float, weight: float) -> Callable:
    """FD-KL extra loss against cached g0 outputs, looked up by batch row index."""

    def extra(model, x, y, idx, z, logits):
        t = temperature
        w = alpha + beta * old_right[idx]
        kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(old_logits[idx] / t, -1),
                      log_target=True, reduction="none").sum(-1)
        return weight * t * t * (w * kl).mean()

    return extra


def _run(method: str, g0: GracefulNet, ds: Dataset, args: argparse.Namespace, seed: int,
         extra: Optional[Callable]) -> tuple[torch.nn.Module, float]:
    train = ds.train
    t0 = time.perf_counter()
    if method.startswith("finetune"):
        spec = TrainSpec(steps=args.steps, lr=args.ft_lr, seed=seed)
        model = fit(copy.deepcopy(g0), train, spec, extra_loss=extra)
    else:
        precond = not method.startswith("lqf_no_precond")
        gen = GenerationSpec(
            name="g1", arch=g0.spec, recipe="lqf",
            train=TrainSpec(steps=args.steps, lr=args.lqf_lr if precond else args.sgd_lr,
                            weight_decay=args.lqf_wd, seed=seed),
            lqf=LQFSpec(target_scale=args.target_scale, damping=args.damping,
                        update_interval=args.update_interval, precondition=precond))
        model = fit_lqf(g0, train, gen, extra_loss=extra)
    return model, time.perf_counter() - t0


def run_seed(seed: int, ds: Dataset, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(seed)
    arch = ArchSpec(type="cnn1d", width=args.width, activation="leaky_relu", negative_slope=args.slope)
    g0 = build_model(arch, ds.input_dim, ds.num_classes)
    fit(g0, generation_train_split(ds, args.g0_fraction), TrainSpec(steps=args.steps, seed=seed))
    y = ds.test.y
    old_pred = predict(g0, ds.test.x)[1].argmax(1)
    _, old_train_logits = predict(g0, ds.train.x)
    old_right = torch.as_tensor((old_train_logits.argmax(1) == ds.train.y).astype(np.float32))
    fd = _focal_distillation(torch.as_tensor(old_train_logits), old_right, args.fd_alpha, args.fd_beta,
                             args.fd_temperature, args.fd_weight)
    rows = [{"method": "g0", "seed": seed, "error": error_rate(y, old_pred), "nfr": 0.0, "train_seconds": None}]
    for method in args.methods:
        model, secs = _run(method, g0, ds, args, seed, fd if method.endswith("_fd") else None)
        pred = predict(model, ds.test.x)[1].argmax(1)
        rows.append({"method": method, "seed": seed, "error": error_rate(y, pred), "nfr": nfr(y, old_pred, pred),
                     "train_seconds": round(secs, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def merge(path: Path, rows: list[dict]) -> list[dict]:
    """Rows of `path` with those of the same (method, seed) replaced by `rows`."""
    old = json.loads(path.read_text()) if path.is_file() else []
    keys = {(r["method"], r["seed"]) for r in rows}
    return [r for r in old if (r["method"], r["seed"]) not in keys] + rows


def table(rows: list[dict]) -> str:
    """Markdown table: mean +- std over seeds of error and NFR (in %), and train seconds."""
    out = ["| method | seeds | error % | NFR % vs g0 | train s |", "|---|---|---|---|---|"]
    for m in ["g0"] + METHODS:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        e = 100 * np.array([r["error"] for r in rs])
        n = 100 * np.array([r["nfr"] for r in rs])
        secs = [r["train_seconds"] for r in rs if r["train_seconds"] is not None]
        t = f"{np.mean(secs):.1f}" if secs else "-"
        out.append(f"| {m} | {len(rs)} | {e.mean():.2f} ± {e.std():.2f} | {n.mean():.2f} ± {n.std():.2f} | {t} |")
    return "\n".join(out)


def figure(ncols: int, figsize: tuple[float, float]):
    """(fig, axes) of a headless matplotlib figure with `ncols` panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=figsize, squeeze=False)


def save_figure(fig, axes, path: Path) -> None:
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parser(seeds: list[int], methods: list[str]) -> argparse.ArgumentParser:
    """The benchmarks' common flags: --seeds (split a long run by seed) and --methods."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=seeds)
    ap.add_argument("--methods", nargs="+", default=methods, choices=methods)
    return ap


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = figure(1, (6, 4.5))
    ax = axes[0, 0]
    for m in METHODS:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        e = 100 * np.array([r["error"] for r in rs])
        n = 100 * np.array([r["nfr"] for r in rs])
        pts = ax.scatter(e, n, alpha=0.35, marker="o" if "fd" not in m else "s")
        ax.errorbar(e.mean(), n.mean(), xerr=e.std(), yerr=n.std(), fmt="o" if "fd" not in m else "s",
                    color=pts.get_facecolor()[0][:3], label=m, capsize=3)
    ax.set_xlabel("error of generation 1 (%)")
    ax.set_ylabel("negative flip rate vs generation 0 (%)")
    ax.set_title("MNIST-1D: fine-tuning g1 from g0 (mean ± std, dots: seeds)")
    save_figure(fig, [ax], path)


def main(argv: Optional[list[str]] = None) -> None:
    ap = parser([0, 1, 2], METHODS)
    ap.add_argument("--num-samples", type=int, default=25000, help="test split 40 %%: 10,000 samples")
    ap.add_argument("--g0-fraction", type=float, default=0.25)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--slope", type=float, default=0.1, help="leaky ReLU slope")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--ft-lr", type=float, default=3e-3, help="AdamW, finetune")
    ap.add_argument("--lqf-lr", type=float, default=0.1, help="fraction of the exact step, lqf")
    ap.add_argument("--sgd-lr", type=float, default=0.2, help="lqf_no_precond")
    ap.add_argument("--lqf-wd", type=float, default=1e-4)
    ap.add_argument("--target-scale", type=float, default=20.0)
    ap.add_argument("--damping", type=float, default=1e-2)
    ap.add_argument("--update-interval", type=int, default=20)
    ap.add_argument("--fd-alpha", type=float, default=0.0)
    ap.add_argument("--fd-beta", type=float, default=1.0)
    ap.add_argument("--fd-temperature", type=float, default=1.0)
    ap.add_argument("--fd-weight", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "lqf.json")
    ap.add_argument("--no-save", action="store_true", help="print only (tuning runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    ds = load_dataset(DataSpec(source="mnist1d", num_samples=args.num_samples, test_fraction=0.4))
    rows = [r for s in args.seeds for r in run_seed(s, ds, args)]
    if not args.no_save:
        rows = merge(args.out, rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        plot(rows, args.out.with_suffix(".png"))
    print(table(rows))


if __name__ == "__main__":
    main()
