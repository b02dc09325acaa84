"""Error vs negative flip rate of a new model against a fixed old one (MNIST-1D).

Set-up: 25,000 samples (10,000 test, 500 validation,
14,500 training pool); old model a 1D CNN with 16 channels trained on 2,000 samples; new
model a CNN with 32 channels on 12,000; L2-normalised 64-d embedding, cosine head (scale
16); AdamW 3e-3, cosine decay, 3,000 steps of batch 128. The old model is the same for
every seed; each seed changes the new model's initialisation and batch order.

Methods (the new model is always served as one model, except `ensemble_served`):
  plain             cross-entropy only
  fd_kl             + Focal Distillation, KL form, alpha 0, beta 1, T 4, weight 1
  fd_lm             + Focal Distillation, logit matching, alpha 0, beta 1, weight 0.2
  ensemble_distill  + mean squared difference to the mean logits of 4 reference models of
                    the new architecture (independent seeds, trained as Ray tasks 2 at a
                    time), weight 0.5 (ELODI-style)
  ensemble_distill_top3  the same on the ensemble's top-3 classes only, weight 1
  ensemble_served   the 4 references themselves, averaged at serving time (4x the cost)

Models are trained with the single-process `fit` plus the Ray Train loop's loss terms
(`workers.train.make_extra_loss` over cached old/ensemble logits). `train_seconds` of
the distilled methods includes the wall time of the references (shared by both).

Rows {"method", "seed", "error", "nfr", "pfr", "train_seconds"} (rates as fractions) go to
benchmarks/results/nfr_pareto.json (merged by (method, seed): seeds can run in parts),
with the error/NFR plane in nfr_pareto.png:

    flock /tmp/graceful-cpu.lock timeout 590 python -m benchmarks.nfr_pareto --seeds 0 1 2
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from benchmarks.common import (RESULTS, axes, cnn, merge_rows, mean_std, mnist1d, ray_map, save_png,
                               seeds_parser, train, write_json)
from orchestrator.evaluation.metrics import error_rate, nfr, pfr
from workers.data import Dataset
from workers.specs import CompatSpec, EnsembleSpec, FocalDistillationSpec, TrainSpec
from workers.train import CompatTargets
from workers.training import predict

NUM_SAMPLES, TEST_FRACTION = 25_000, 0.4
OLD_SAMPLES, NEW_SAMPLES = 2_000, 12_000
MEMBERS = 4
DISTILLED = {
    "fd_kl": CompatSpec(focal_distillation=FocalDistillationSpec(form="kl", alpha=0, beta=1, temperature=4, weight=1)),
    "fd_lm": CompatSpec(focal_distillation=FocalDistillationSpec(form="lm", alpha=0, beta=1, weight=0.2)),
    "ensemble_distill": CompatSpec(ensemble=EnsembleSpec(members=MEMBERS, weight=0.5)),
    "ensemble_distill_top3": CompatSpec(ensemble=EnsembleSpec(members=MEMBERS, weight=1.0, top_k=3)),
}
METHODS = ["plain", *DISTILLED, "ensemble_served"]
PATH = RESULTS / "nfr_pareto.json"


STEPS = 3000


def _spec(seed: int, steps: int = STEPS) -> TrainSpec:
    return TrainSpec(steps=steps, batch_size=128, lr=3e-3, seed=seed, eval_every=steps)


def _reference(seed: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """One ensemble member (a Ray task): its logits on the new model's training rows and on test."""
    torch.set_num_threads(1)
    ds = mnist1d(NUM_SAMPLES, TEST_FRACTION)
    model, _ = train(cnn(32), ds.train.take(NEW_SAMPLES), ds.input_dim, ds.num_classes, _spec(seed, steps))
    return predict(model, ds.train.take(NEW_SAMPLES).x)[1], predict(model, ds.test.x)[1]


def run_seed(seed: int, ds: Dataset, old_pred: np.ndarray, old_train_logits: np.ndarray,
             methods: list[str], steps: int = STEPS) -> list[dict]:
    y = ds.test.y
    rows: list[dict] = []

    def row(method: str, pred: np.ndarray, secs: float) -> None:
        r = {"method": method, "seed": seed, "error": error_rate(y, pred), "nfr": nfr(y, old_pred, pred),
             "pfr": pfr(y, old_pred, pred), "train_seconds": round(secs, 1)}
        rows.append(r)
        print(f"  seed {seed} {method:22s} error {100 * r['error']:.2f}%  NFR {100 * r['nfr']:.2f}%  "
              f"PFR {100 * r['pfr']:.2f}%  ({secs:.1f}s)", flush=True)

    ens_train: Optional[np.ndarray] = None
    ref_secs = 0.0
    if any(m.startswith("ensemble") for m in methods):
        t0 = time.perf_counter()
        refs = ray_map(_reference, [(10_000 + 100 * seed + k, steps) for k in range(MEMBERS)])
        ref_secs = time.perf_counter() - t0
        ens_train = np.mean([r[0] for r in refs], axis=0)
        if "ensemble_served" in methods:
            row("ensemble_served", np.mean([r[1] for r in refs], axis=0).argmax(1), ref_secs)
    targets = CompatTargets(old_logits=old_train_logits, ensemble_logits=ens_train)
    new_train = ds.train.take(NEW_SAMPLES)
    for m in methods:
        if m == "ensemble_served":
            continue
        compat = DISTILLED.get(m)
        model, secs = train(cnn(32), new_train, ds.input_dim, ds.num_classes, _spec(seed, steps), compat, targets)
        row(m, predict(model, ds.test.x)[1].argmax(1), secs + (ref_secs if m.startswith("ensemble") else 0.0))
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: mean ± std over seeds (percent), NFI and the relative change to plain."""
    by = {m: [r for r in rows if r["method"] == m] for m in METHODS}
    base = by["plain"]
    base_nfr = np.mean([r["nfr"] for r in base]) if base else float("nan")
    base_err = np.mean([r["error"] for r in base]) if base else float("nan")
    out = ["| method | seeds | error % | NFR % | PFR % | NFI | NFR change | error change (pt) | train s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for m, rs in by.items():
        if not rs:
            continue
        e, n = np.mean([r["error"] for r in rs]), np.mean([r["nfr"] for r in rs])
        nfi = np.mean([r["nfr"] / r["error"] for r in rs if r["error"] > 0])
        change = "–" if m == "plain" else f"{100 * (n / base_nfr - 1):+.0f} %"
        derr = "–" if m == "plain" else f"{100 * (e - base_err):+.2f}"
        out.append(f"| {m} | {len(rs)} | {mean_std(r['error'] for r in rs)} | {mean_std(r['nfr'] for r in rs)} | "
                   f"{mean_std(r['pfr'] for r in rs)} | {nfi:.3f} | {change} | {derr} | "
                   f"{np.mean([r['train_seconds'] for r in rs]):.0f} |")
    return "\n".join(out)


def verdict(rows: list[dict]) -> str:
    """Whether a single-model method meets the target: mean NFR >= 35 % below plain at
    <= +0.2 pt mean error."""
    plain = [r for r in rows if r["method"] == "plain"]
    if not plain:
        return "target: not evaluated (no plain rows)"
    n0, e0 = np.mean([r["nfr"] for r in plain]), np.mean([r["error"] for r in plain])
    hits = []
    for m in METHODS[1:-1]:
        rs = [r for r in rows if r["method"] == m]
        if rs and np.mean([r["nfr"] for r in rs]) <= 0.65 * n0 and np.mean([r["error"] for r in rs]) <= e0 + 0.002:
            hits.append(m)
    return (f"target (single model, NFR -35 % at <= +0.2 pt error): MET by {', '.join(hits)}" if hits
            else "target (single model, NFR -35 % at <= +0.2 pt error): NOT MET")


def plot(rows: list[dict]) -> None:
    fig, (ax,) = axes(1, (6.5, 4.5))
    for m in METHODS:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        e, n = 100 * np.array([r["error"] for r in rs]), 100 * np.array([r["nfr"] for r in rs])
        pts = ax.scatter(e, n, alpha=0.3)
        ax.errorbar(e.mean(), n.mean(), xerr=e.std(), yerr=n.std(), fmt="o", capsize=3,
                    color=pts.get_facecolor()[0][:3], label=m)
    ax.set_xlabel("error of the new model (%)")
    ax.set_ylabel("negative flip rate vs the old model (%)")
    ax.set_title("MNIST-1D, 10,000 test samples (mean ± std; dots: seeds)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_png(fig, PATH.with_suffix(".png"))


def main(argv: Optional[list[str]] = None) -> None:
    ap = seeds_parser(__doc__, [0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--steps", type=int, default=STEPS, help="optimiser steps per model (smoke runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    ds = mnist1d(NUM_SAMPLES, TEST_FRACTION)
    print(f"MNIST-1D: {len(ds.train)} train pool, {len(ds.test)} test; old model on {OLD_SAMPLES}, "
          f"new on {NEW_SAMPLES}", flush=True)
    old, secs = train(cnn(16), ds.train.take(OLD_SAMPLES), ds.input_dim, ds.num_classes, _spec(0, args.steps))
    old_pred = predict(old, ds.test.x)[1].argmax(1)
    # Cached once: the old model's logits on the new model's training rows (FD targets).
    old_train_logits = predict(old, ds.train.take(NEW_SAMPLES).x)[1]
    print(f"old model: error {100 * error_rate(ds.test.y, old_pred):.2f}% ({secs:.1f}s)", flush=True)
    rows: list[dict] = []
    for seed in args.seeds:
        rows += run_seed(seed, ds, old_pred, old_train_logits, args.methods, args.steps)
        write_json(PATH, merge_rows(PATH, rows, lambda r: (r["method"], r["seed"])))
    all_rows = merge_rows(PATH, rows, lambda r: (r["method"], r["seed"]))
    print(table(all_rows))
    print(verdict(all_rows))
    plot(all_rows)


if __name__ == "__main__":
    main()
