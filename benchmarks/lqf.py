"""LQF vs standard fine-tuning of generation 1 from generation 0 on MNIST-1D, in two regimes.

  weak_parent  generation 0 (1D CNN, leaky ReLU) trains on the first `--g0-fraction` of a
               15,000-row pool (about 12 % error); generation 1 starts from it and sees
               the whole pool: LQF linearises around a weak network (the hard case).
  pretrained   generation 0 is pre-trained on a large pool (`--pretrain-samples` rows of
               another MNIST-1D draw, seed 1) and is the same for every seed; the new data
               is a shifted domain (`--shift` 0.5: MNIST-1D with 1.5x the correlated noise,
               more shear and translation, seed 2): generation 1 fine-tunes it on `--new-samples` rows and is
               tested on 10,000 rows of that domain. This is LQF's own regime: a strong
               pre-trained network adapted to new data.

Generation 1 by one of:

  finetune        the non-linear network, cross-entropy, AdamW (training.fit)
  lqf             the linearisation around g0, square loss, K-FAC-preconditioned SGD
  lqf_no_precond  the same without the preconditioner (ablation)

and each again with Focal Distillation from g0 (`_fd`). Error and NFR (vs g0, on the
regime's test set of 10,000); rows {"regime", "method", "seed", "error", "nfr",
"train_seconds"} are merged into benchmarks/results/lqf.json (by regime, method and seed,
so parts can run in separate processes).

    python -m benchmarks.lqf --regimes weak_parent pretrained --seeds 0 1 2
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
from workers.data import Split, generation_train_split, load_dataset
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


def _run(method: str, g0: GracefulNet, train: Split, args: argparse.Namespace, seed: int,
         extra: Optional[Callable]) -> tuple[torch.nn.Module, float]:
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


def _arch(args: argparse.Namespace) -> ArchSpec:
    return ArchSpec(type="cnn1d", width=args.width, activation="leaky_relu", negative_slope=args.slope)


def mnist1d_domain(num_samples: int, seed: int, shift: float) -> Split:
    """MNIST-1D rows drawn by `seed`; `shift` s > 0: another domain, with (1 + s) times the
    correlated noise, shear 0.75 + 0.25 s and translations up to 48 + 8 s."""
    from mnist1d.data import get_dataset_args, make_dataset

    a = get_dataset_args()
    a.num_samples, a.seed, a.train_split = num_samples, seed, 1.0
    a.corr_noise_scale *= 1 + shift
    a.shear_scale += 0.25 * shift
    a.max_translation = int(round(a.max_translation + 8 * shift))
    state = np.random.get_state()
    try:
        d = make_dataset(a)
    finally:
        np.random.set_state(state)
    return Split(d["x"].astype(np.float32), d["y"].astype(np.int64))


def weak_parent(seed: int, args: argparse.Namespace) -> tuple[GracefulNet, Split, Split]:
    """(g0, generation 1's training rows, test rows): g0 on a prefix of the pool, per seed."""
    ds = load_dataset(DataSpec(source="mnist1d", num_samples=args.num_samples, test_fraction=0.4))
    torch.manual_seed(seed)
    g0 = build_model(_arch(args), ds.input_dim, ds.num_classes)
    fit(g0, generation_train_split(ds, args.g0_fraction), TrainSpec(steps=args.steps, seed=seed))
    return g0, ds.train, ds.test


_PRETRAINED: dict = {}


def pretrained(seed: int, args: argparse.Namespace) -> tuple[GracefulNet, Split, Split]:
    """(g0, generation 1's training rows, test rows): g0 pre-trained once (seed 0) on a
    large pool; generation 1's rows and the test rows from the shifted domain."""
    if not _PRETRAINED:
        pool = mnist1d_domain(args.pretrain_samples, seed=1, shift=0.0)
        torch.manual_seed(0)
        g0 = build_model(_arch(args), pool.x.shape[1:], 10)
        t0 = time.perf_counter()
        fit(g0, pool, TrainSpec(steps=args.pretrain_steps, seed=0))
        new = mnist1d_domain(args.new_samples + 10_000, seed=2, shift=args.shift)
        _PRETRAINED.update(g0=g0, train=new.take(args.new_samples), test=Split(new.x[-10_000:], new.y[-10_000:]))
        print(f"[pretrained] g0 pre-trained on {len(pool)} rows in {time.perf_counter() - t0:.1f}s", flush=True)
    return _PRETRAINED["g0"], _PRETRAINED["train"], _PRETRAINED["test"]


REGIMES = {"weak_parent": weak_parent, "pretrained": pretrained}


def run_seed(regime: str, seed: int, args: argparse.Namespace) -> list[dict]:
    g0, train, test = REGIMES[regime](seed, args)
    y = test.y
    old_pred = predict(g0, test.x)[1].argmax(1)
    _, old_train_logits = predict(g0, train.x)
    old_right = torch.as_tensor((old_train_logits.argmax(1) == train.y).astype(np.float32))
    fd = _focal_distillation(torch.as_tensor(old_train_logits), old_right, args.fd_alpha, args.fd_beta,
                             args.fd_temperature, args.fd_weight)
    rows = [{"regime": regime, "method": "g0", "seed": seed, "error": error_rate(y, old_pred), "nfr": 0.0,
             "train_seconds": None}]
    for method in args.methods:
        model, secs = _run(method, g0, train, args, seed, fd if method.endswith("_fd") else None)
        pred = predict(model, test.x)[1].argmax(1)
        rows.append({"regime": regime, "method": method, "seed": seed, "error": error_rate(y, pred),
                     "nfr": nfr(y, old_pred, pred), "train_seconds": round(secs, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def merge(path: Path, rows: list[dict]) -> list[dict]:
    """Rows of `path` with those of the same (regime, method, seed) replaced by `rows`."""
    old = json.loads(path.read_text()) if path.is_file() else []
    key = lambda r: (r.get("regime"), r["method"], r["seed"])  # noqa: E731
    keys = {key(r) for r in rows}
    return [r for r in old if key(r) not in keys] + rows


def table(rows: list[dict], regime: str) -> str:
    """Markdown table of one regime: mean +- std over seeds of error and NFR (in %), and train seconds."""
    out = ["| method | seeds | error % | NFR % vs g0 | train s |", "|---|---|---|---|---|"]
    for m in ["g0"] + METHODS:
        rs = [r for r in rows if r["method"] == m and r.get("regime") == regime]
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
    regimes = [g for g in REGIMES if any(r.get("regime") == g for r in rows)]
    if not regimes:
        return
    fig, axes = figure(len(regimes), (6 * len(regimes), 4.5))
    for ax, g in zip(axes[0], regimes):
        for m in METHODS:
            rs = [r for r in rows if r["method"] == m and r.get("regime") == g]
            if not rs:
                continue
            e = 100 * np.array([r["error"] for r in rs])
            n = 100 * np.array([r["nfr"] for r in rs])
            pts = ax.scatter(e, n, alpha=0.35, marker="o" if "fd" not in m else "s")
            ax.errorbar(e.mean(), n.mean(), xerr=e.std(), yerr=n.std(), fmt="o" if "fd" not in m else "s",
                        color=pts.get_facecolor()[0][:3], label=m, capsize=3)
        ax.set_xlabel("error of generation 1 (%)")
        ax.set_ylabel("negative flip rate vs generation 0 (%)")
        ax.set_title(f"{g}: fine-tuning g1 from g0 (mean ± std, dots: seeds)", fontsize=9)
    save_figure(fig, list(axes[0][:len(regimes)]), path)


def main(argv: Optional[list[str]] = None) -> None:
    ap = parser([0, 1, 2], METHODS)
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--num-samples", type=int, default=25000, help="weak_parent: test split 40 %%: 10,000 samples")
    ap.add_argument("--g0-fraction", type=float, default=0.25, help="weak_parent: g0's share of the pool")
    ap.add_argument("--pretrain-samples", type=int, default=40000, help="pretrained: g0's pre-training rows")
    ap.add_argument("--pretrain-steps", type=int, default=4000, help="pretrained: g0's pre-training steps")
    ap.add_argument("--new-samples", type=int, default=5000, help="pretrained: generation 1's rows of the new domain")
    ap.add_argument("--shift", type=float, default=0.5,
                    help="pretrained: how far the new domain is from g0's (0: the same domain)")
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
    rows: list[dict] = []
    for g in args.regimes:
        for s in args.seeds:
            rows += run_seed(g, s, args)
            if not args.no_save:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(merge(args.out, rows), indent=1) + "\n")
    if not args.no_save:
        rows = merge(args.out, [])
        plot(rows, args.out.with_suffix(".png"))
    for g in REGIMES:
        if any(r.get("regime") == g for r in rows):
            print(f"\n{g}\n{table(rows, g)}")


if __name__ == "__main__":
    main()
