"""The compatibility tax along a chain of 5 generations on MNIST-1D (issue 11).

Generation k sees more data and is wider (2k, 5k, 8k, 11k, 14k samples; 16, 32, 32, 48,
48 channels), with an L2-normalised 64-d embedding
and a cosine head. Three ways to train g1..g4 (g0 is shared):

  independent      cross-entropy only
  bct_production   + BCT influence loss through the frozen head of the model in
                   production (the previous generation of the same chain)
  bct_ancestors    + BCT through the heads of all ancestors, weight 0.5^(distance-1),
                   normalised (the gallery's model g0 always among them)

Single-process `training.fit` with the exact BCT term the Ray Train workers add
(`workers.train.make_extra_loss` over frozen heads); the benchmark measures the method,
not the distribution. Retrieval top-1
(faiss, cosine) on the test split's query/gallery halves: M(gk, gk) and M(gk, g0).

Per-seed rows go to benchmarks/results/chain_tax_seeds.json (merged by seed, so seeds can
run in separate processes); the mean over seeds, rows {"method", "generation",
"top1_self", "top1_vs_g0", "error"}, to benchmarks/results/chain_tax.json, plus a PNG.

    flock /tmp/graceful-cpu.lock timeout 480 python -m benchmarks.chain_tax --seeds 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from benchmarks.lqf import figure, parser, save_figure
from orchestrator.evaluation.metrics import error_rate, retrieval_top1
from workers.data import Dataset, generation_train_split, load_dataset
from workers.models import GracefulNet, build_model
from workers.losses import FrozenHead, ancestor_importances, frozen_head
from workers.specs import ArchSpec, BCTSpec, CompatSpec, DataSpec, TrainSpec
from workers.train import CompatTargets, make_extra_loss
from workers.training import fit, predict

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["independent", "bct_production", "bct_ancestors"]
FRACTIONS = [2 / 14, 5 / 14, 8 / 14, 11 / 14, 1.0]
WIDTHS = [16, 32, 32, 48, 48]
KEYS = ("top1_self", "top1_vs_g0", "error")


def constraints(method: str, chain: list[GracefulNet], decay: float) -> list[FrozenHead]:
    """Frozen heads (with importances) generation len(chain) is trained against: the same
    constraint sets `orchestrator.chain.constraint_names` builds for a config."""
    if method == "independent":
        return []
    if method == "bct_production":
        return [frozen_head(chain[-1], f"g{len(chain) - 1}")]
    weights = ancestor_importances(range(1, len(chain) + 1), decay)  # parent first
    return [frozen_head(m, f"g{k}", w) for (k, m), w in zip(reversed(list(enumerate(chain))), weights)]


def bct_extra_loss(heads: list[FrozenHead], weight: float):
    """The loss term the Ray Train workers add for `compat.bct` (workers.train.make_extra_loss)."""
    return make_extra_loss(CompatSpec(bct=BCTSpec(weight=weight)), CompatTargets(heads=heads)) if heads else None


def _frozen(model: GracefulNet) -> GracefulNet:
    model.eval().requires_grad_(False)
    return model


def run_seed(seed: int, ds: Dataset, args: argparse.Namespace) -> list[dict]:
    q, g = ds.query, ds.gallery

    def measure(model: GracefulNet, g0: GracefulNet) -> dict:
        qz = predict(model, q.x)[0]
        return {"top1_self": retrieval_top1(qz, q.y, predict(model, g.x)[0], g.y),
                "top1_vs_g0": retrieval_top1(qz, q.y, predict(g0, g.x)[0], g.y),
                "error": error_rate(ds.test.y, predict(model, ds.test.x)[1].argmax(1))}

    def train(k: int, extra=None) -> GracefulNet:
        torch.manual_seed(100 * seed + k)
        model = build_model(ArchSpec(width=WIDTHS[k]), ds.input_dim, ds.num_classes)
        spec = TrainSpec(steps=args.steps, seed=100 * seed + k)
        return _frozen(fit(model, generation_train_split(ds, FRACTIONS[k]), spec, extra_loss=extra))

    g0 = train(0)
    base = measure(g0, g0)
    rows = [{"method": m, "generation": 0, "seed": seed, **base} for m in METHODS]
    for method in args.methods:
        chain = [g0]
        for k in range(1, 5):
            t0 = time.perf_counter()
            extra = bct_extra_loss(constraints(method, chain, args.decay), args.weight)
            chain.append(train(k, extra))
            rows.append({"method": method, "generation": k, "seed": seed, **measure(chain[-1], g0),
                         "train_seconds": round(time.perf_counter() - t0, 2)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def mean_rows(seed_rows: list[dict]) -> list[dict]:
    """Mean over seeds per (method, generation), with exactly the issue's keys."""
    out = []
    for m in METHODS:
        for k in range(5):
            rs = [r for r in seed_rows if r["method"] == m and r["generation"] == k]
            if rs:
                out.append({"method": m, "generation": k,
                            **{key: round(float(np.mean([r[key] for r in rs])), 5) for key in KEYS}})
    return out


def table(rows: list[dict], seeds: int) -> str:
    """Markdown table in %: own top-1, tax vs independent, M(gk, g0), error."""
    by = {(r["method"], r["generation"]): r for r in rows}
    out = ["| generation | method | M(gk,gk) | tax (indep - this) | M(gk,g0) | M(gk,g0) > M(g0,g0) | error % |",
           "|---|---|---|---|---|---|---|"]
    m00 = by.get(("independent", 0), {}).get("top1_self")
    for k in range(5):
        for m in METHODS:
            r = by.get((m, k))
            if r is None:
                continue
            ind = by.get(("independent", k))
            tax = f"{100 * (ind['top1_self'] - r['top1_self']):+.2f}" if ind and m != "independent" else "–"
            ok = "–" if k == 0 or m00 is None else ("yes" if r["top1_vs_g0"] > m00 else "no")
            out.append(f"| g{k} | {m} | {100 * r['top1_self']:.2f} | {tax} | {100 * r['top1_vs_g0']:.2f} | {ok} "
                       f"| {100 * r['error']:.2f} |")
    return f"(mean of {seeds} seeds)\n" + "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    by = {(r["method"], r["generation"]): r for r in rows}
    gens = list(range(5))
    fig, axes = figure(2, (10, 4))
    ax1, ax2 = axes[0]
    for m in METHODS:
        ks = [k for k in gens if (m, k) in by]
        color = f"C{METHODS.index(m)}"  # the same colour for a method in both panels
        ax2.plot(ks, [100 * by[(m, k)]["top1_vs_g0"] for k in ks], "o-", label=m, color=color)
        if m != "independent":
            ks = [k for k in ks if ("independent", k) in by]
            ax1.plot(ks, [100 * (by[("independent", k)]["top1_self"] - by[(m, k)]["top1_self"]) for k in ks],
                     "o-", label=m, color=color)
    if ("independent", 0) in by:
        ax2.axhline(100 * by[("independent", 0)]["top1_self"], color="grey", ls="--", label="M(g0, g0)")
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set(xlabel="generation k", ylabel="tax: M(gk,gk) independent − constrained (points)",
            title="compatibility tax", xticks=gens)
    ax2.set(xlabel="generation k", ylabel="M(gk, g0) top-1 (%)", title="compatibility with g0's gallery",
            xticks=gens)
    save_figure(fig, [ax1, ax2], path)


def main(argv: Optional[list[str]] = None) -> None:
    ap = parser([0, 1], METHODS)
    ap.description = __doc__
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--weight", type=float, default=1.0, help="BCT influence loss weight")
    ap.add_argument("--decay", type=float, default=0.5, help="bct_ancestors: weight per step back")
    ap.add_argument("--out", type=Path, default=RESULTS / "chain_tax.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    ds = load_dataset(DataSpec(source="mnist1d", num_samples=17500, test_fraction=0.2, val_fraction=0.0))
    new = [r for s in args.seeds for r in run_seed(s, ds, args)]
    raw_path = args.out.with_name(args.out.stem + "_seeds.json")
    old = json.loads(raw_path.read_text()) if raw_path.is_file() else []
    done = {(r["method"], r["generation"], r["seed"]) for r in new}
    seed_rows = [r for r in old if (r["method"], r["generation"], r["seed"]) not in done] + new
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw_path.write_text(json.dumps(seed_rows, indent=1) + "\n")
    rows = mean_rows(seed_rows)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(table(rows, len({r["seed"] for r in seed_rows})))


if __name__ == "__main__":
    main()
