"""Error vs negative flip rate of a new model against the old one, in four update regimes.

Regimes (the old model is trained once per regime, seed 0, and is the same for every seed):

  close         MNIST-1D; old CNN 32 channels on 10,000 samples, new the same CNN on
                17,000 (same family, more data: old error at most 1.5x the new)
  arch_upgrade  MNIST-1D; old MLP (2 x 256) on 12,000, new CNN 32 on the same 12,000
  large_jump    MNIST-1D; old CNN 16 on 2,000, new CNN 32 on 12,000 (the old model is
                much weaker)
  image         examples/image_resnet: scikit-learn's 8x8 digits as images, the example's
                own residual Conv2d factory; old width 8 (300 steps), new width 16 (600)

MNIST-1D regimes: 30,000 samples: 10,000 test, 3,000 validation, a 17,000 training pool;
L2-normalised 64-d embedding, cosine head (scale 16); AdamW 3e-3, cosine decay, 3,000
steps of batch 128. The image regime has 1,797 images: 539 test, 180 validation.

Methods (every one is a `generations[].compat` setting; the new model is one served
model except `ensemble_served`):
  plain             cross-entropy only
  fd_official       Focal Distillation as the authors' code sets it: KL, alpha 1, beta 5,
                    temperature 100 (the per-sample weight filters on old-correct), weight 1
  fd_tuned          Focal Distillation, the setting of FD_GRID chosen on the validation split
  ensemble_distill  ELODI-style: + mean squared difference to the mean logits of 4
                    reference models of the new architecture (other seeds, Ray tasks 2 at a
                    time); the weight of ENSEMBLE_GRID chosen on the validation split
  bcwi              weight interpolation: fine-tuned from the old model's weights, then
                    moved back toward them by the largest alpha whose validation error is
                    within the fine-tuned model's (workers.interpolation); only where old
                    and new share an architecture (close)
  bcwi_ensemble     both: fine-tuned from the old weights with ensemble_distill's term
                    (its chosen weight), then interpolated as bcwi (close only)
  ensemble_served   the 4 references averaged at serving time (4x the serving cost)

Choosing on validation (seed 0, once per regime, kept in nfr_pareto_tuning.json): each
setting is trained with seed 0 and the one with the lowest validation NFR whose
validation error is at most plain's + `TUNE_TOLERANCE` wins (none: the lowest error).
The test split is never looked at to choose.

Models are trained with the single-process `fit` plus the Ray Train loop's loss terms
(`workers.train.make_extra_loss` over cached old/ensemble logits), with a fixed torch
thread count (2 here, 1 in the Ray tasks): the same seed gives the same weights on the
same machine (`weights_sha256` in each row). `train_seconds` of the ensemble methods
includes the wall time of the references (shared by both).

Rows {"regime", "method", "seed", "error", "nfr", "pfr", "nfi", "train_seconds", ...}
(rates as fractions) go to benchmarks/results/nfr_pareto.json, merged by (regime,
method, seed) so regimes and seeds can run in parts; the error/NFR plane per regime in
nfr_pareto.png:

    python -m benchmarks.nfr_pareto --regimes close --seeds 0 1 2 3 4
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from benchmarks.common import RESULTS, axes, cnn, merge_rows, mean_std, ray_map, save_png, seeds_parser, write_json
from orchestrator.evaluation.metrics import error_rate, nfr, pfr
from workers.data import Dataset, Split, load_dataset
from workers.interpolation import apply_interpolation
from workers.models import build_model
from workers.specs import (ArchSpec, CompatSpec, DataSpec, EnsembleSpec, FocalDistillationSpec, TrainSpec,
                           WeightInterpolationSpec)
from workers.train import CompatTargets, make_extra_loss
from workers.training import fit, predict

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "image_resnet"
PATH = RESULTS / "nfr_pareto.json"
TUNING = RESULTS / "nfr_pareto_tuning.json"
MEMBERS = 4
TUNE_TOLERANCE = 0.002  # validation error allowed above plain's when choosing a setting


def _mlp(width: int) -> ArchSpec:
    return ArchSpec(type="mlp", width=width, depth=2, embed_dim=64, head="cosine", scale=16.0)


def _resnet(width: int) -> ArchSpec:
    return ArchSpec(type="custom", factory="resnet:build", kwargs={"width": width, "blocks": 2, "embed_dim": 32})


@dataclass(frozen=True)
class Regime:
    name: str
    data: DataSpec
    old_arch: ArchSpec
    new_arch: ArchSpec
    old_samples: Optional[int]  # a prefix of the training pool; None: all of it
    new_samples: Optional[int]
    old_train: TrainSpec
    new_train: TrainSpec


def _mnist1d_spec(steps: int = 3000) -> TrainSpec:
    return TrainSpec(steps=steps, batch_size=128, lr=3e-3, seed=0, eval_every=steps)


MNIST1D = DataSpec(source="mnist1d", num_samples=30_000, seed=0, test_fraction=1 / 3, val_fraction=0.1)
DIGITS = DataSpec(source="custom", factory="digits_images:load", test_fraction=0.3, val_fraction=0.1)
REGIMES = {
    "close": Regime("close", MNIST1D, cnn(32), cnn(32), 10_000, 17_000, _mnist1d_spec(), _mnist1d_spec()),
    "arch_upgrade": Regime("arch_upgrade", MNIST1D, _mlp(256), cnn(32), 12_000, 12_000, _mnist1d_spec(),
                           _mnist1d_spec()),
    "large_jump": Regime("large_jump", MNIST1D, cnn(16), cnn(32), 2_000, 12_000, _mnist1d_spec(), _mnist1d_spec()),
    "image": Regime("image", DIGITS, _resnet(8), _resnet(16), None, None,
                    TrainSpec(steps=300, batch_size=64, lr=0.01, eval_every=300),
                    TrainSpec(steps=600, batch_size=64, lr=0.01, eval_every=600)),
}

FD_OFFICIAL = FocalDistillationSpec(form="kl", alpha=1, beta=5, temperature=100, weight=1)
FD_GRID = {
    "kl_a1_b5_t100_w0.1": FocalDistillationSpec(form="kl", alpha=1, beta=5, temperature=100, weight=0.1),
    "kl_a1_b5_t100_w0.3": FocalDistillationSpec(form="kl", alpha=1, beta=5, temperature=100, weight=0.3),
    "kl_a0_b1_t4_w0.3": FocalDistillationSpec(form="kl", alpha=0, beta=1, temperature=4, weight=0.3),
    "kl_a0_b1_t4_w1": FocalDistillationSpec(form="kl", alpha=0, beta=1, temperature=4, weight=1),
    "lm_a0_b1_w0.05": FocalDistillationSpec(form="lm", alpha=0, beta=1, weight=0.05),
}
ENSEMBLE_GRID = {f"w{w:g}": EnsembleSpec(members=MEMBERS, weight=w) for w in (0.5, 1.0, 2.0)}
METHODS = ["plain", "fd_official", "fd_tuned", "ensemble_distill", "bcwi", "bcwi_ensemble", "ensemble_served"]


def _dataset(regime: Regime) -> Dataset:
    return load_dataset(regime.data)


def _take(split: Split, n: Optional[int]) -> Split:
    return split if n is None else split.take(n)


def _with_example_path() -> None:
    """The image regime's factories live in examples/image_resnet (as its config's
    runtime_env ships them): on this process's path and, through PYTHONPATH, the Ray tasks'."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    root = str(EXAMPLE.parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join([root, str(EXAMPLE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of the parameters and buffers, in state_dict order: equal weights, equal hash."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _train(arch: ArchSpec, ds: Dataset, data: Split, spec: TrainSpec, compat: Optional[CompatSpec] = None,
           targets: Optional[CompatTargets] = None, init: Optional[dict] = None) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(spec.seed)
    model = build_model(arch, ds.input_shape, ds.num_classes)
    if init is not None:
        model.load_state_dict(init)
    extra = make_extra_loss(compat, targets) if compat is not None and targets is not None else None
    t0 = time.perf_counter()
    fit(model, data, spec, extra_loss=extra)
    return model, time.perf_counter() - t0


def _reference(regime_name: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One ensemble member (a Ray task, 1 thread): its logits on the new model's training
    rows, on validation and on test."""
    torch.set_num_threads(1)
    _with_example_path()
    regime = REGIMES[regime_name]
    ds = _dataset(regime)
    train = _take(ds.train, regime.new_samples)
    model, _ = _train(regime.new_arch, ds, train, regime.new_train.model_copy(update={"seed": seed}))
    return predict(model, train.x)[1], predict(model, ds.val.x)[1], predict(model, ds.test.x)[1]


@dataclass
class Old:
    """The old model's predictions, computed once per regime."""

    state: dict
    val_pred: np.ndarray
    test_pred: np.ndarray
    train_logits: np.ndarray  # on the new model's training rows (Focal Distillation's targets)
    error: float


def train_old(regime: Regime, ds: Dataset) -> Old:
    model, secs = _train(regime.old_arch, ds, _take(ds.train, regime.old_samples), regime.old_train)
    test_pred = predict(model, ds.test.x)[1].argmax(1)
    err = error_rate(ds.test.y, test_pred)
    print(f"[{regime.name}] old model: test error {100 * err:.2f}% ({secs:.1f}s)", flush=True)
    return Old({k: v.detach().clone() for k, v in model.state_dict().items()}, predict(model, ds.val.x)[1].argmax(1),
               test_pred, predict(model, _take(ds.train, regime.new_samples).x)[1], err)


@dataclass
class Ensemble:
    train_logits: np.ndarray
    val_logits: np.ndarray
    test_logits: np.ndarray
    seconds: float


def references(regime: Regime, seed: int) -> Ensemble:
    t0 = time.perf_counter()
    refs = ray_map(_reference, [(regime.name, 10_000 + 100 * seed + k) for k in range(MEMBERS)])
    return Ensemble(*(np.mean([r[i] for r in refs], axis=0) for i in range(3)), time.perf_counter() - t0)


class Trainer:
    """Trains one regime's methods for one seed and scores them."""

    def __init__(self, regime: Regime, ds: Dataset, old: Old):
        self.regime, self.ds, self.old = regime, ds, old
        self.train_split = _take(ds.train, regime.new_samples)

    def spec(self, seed: int) -> TrainSpec:
        return self.regime.new_train.model_copy(update={"seed": seed})

    def fit(self, seed: int, compat: Optional[CompatSpec] = None, ens: Optional[Ensemble] = None):
        targets = CompatTargets(old_logits=self.old.train_logits,
                                ensemble_logits=ens.train_logits if ens is not None else None)
        return _train(self.regime.new_arch, self.ds, self.train_split, self.spec(seed), compat, targets)

    def bcwi(self, seed: int, compat: Optional[CompatSpec] = None,
             ens: Optional[Ensemble] = None) -> tuple[torch.nn.Module, float, dict]:
        targets = CompatTargets(ensemble_logits=ens.train_logits) if ens is not None else None
        model, secs = _train(self.regime.new_arch, self.ds, self.train_split, self.spec(seed), compat, targets,
                             init=self.old.state)
        wi = WeightInterpolationSpec()
        rec = apply_interpolation(model, self.old.state, wi.alpha, wi.max_error_increase, self.ds.val.x, self.ds.val.y)
        return model, secs, rec

    def val_scores(self, pred: np.ndarray) -> tuple[float, float]:
        return error_rate(self.ds.val.y, pred), nfr(self.ds.val.y, self.old.val_pred, pred)

    def row(self, method: str, seed: int, pred: np.ndarray, secs: float, **extra) -> dict:
        y = self.ds.test.y
        err = error_rate(y, pred)
        r = {"regime": self.regime.name, "method": method, "seed": seed, "error": err,
             "nfr": nfr(y, self.old.test_pred, pred), "pfr": pfr(y, self.old.test_pred, pred),
             "train_seconds": round(secs, 1), "test_rows": len(y), "old_error": self.old.error, **extra}
        r["nfi"] = r["nfr"] / err if err > 0 else None
        print(f"  [{self.regime.name}] seed {seed} {method:17s} error {100 * err:.2f}%  NFR {100 * r['nfr']:.2f}%  "
              f"PFR {100 * r['pfr']:.2f}%  ({secs:.1f}s)", flush=True)
        return r


def choose(candidates: dict[str, tuple[float, float]], plain_val_error: float) -> str:
    """The setting with the lowest validation NFR among those whose validation error is at
    most plain's + TUNE_TOLERANCE; none such: the lowest validation error.

    >>> choose({"a": (0.050, 0.010), "b": (0.041, 0.012), "c": (0.039, 0.015)}, 0.040)
    'b'

    (budget 0.042: b and c qualify, b has the lower NFR; a's 0.010 is out at 0.050.)
    """
    ok = {k: v for k, v in candidates.items() if v[0] <= plain_val_error + TUNE_TOLERANCE}
    if ok:
        return min(ok, key=lambda k: (ok[k][1], ok[k][0]))
    return min(candidates, key=lambda k: candidates[k][0])


def tune(t: Trainer, ens: Ensemble) -> tuple[dict, dict[str, tuple]]:
    """Choose fd_tuned's and ensemble_distill's settings on validation (seed 0). Returns the
    record for nfr_pareto_tuning.json and the seed-0 models of the chosen settings' runs
    (test predictions, seconds), which are that seed's rows."""
    plain, secs = t.fit(0)
    plain_val = t.val_scores(predict(plain, t.ds.val.x)[1].argmax(1))
    record: dict = {"plain_val": plain_val, "fd": {}, "ensemble": {}}
    kept: dict[str, tuple] = {"plain": (plain, secs)}
    grids = [("fd", "fd_tuned", {k: CompatSpec(focal_distillation=v) for k, v in FD_GRID.items()}),
             ("ensemble", "ensemble_distill", {k: CompatSpec(ensemble=v) for k, v in ENSEMBLE_GRID.items()})]
    for kind, method, grid in grids:
        models = {}
        for name, compat in grid.items():
            model, s = t.fit(0, compat, ens)
            record[kind][name] = t.val_scores(predict(model, t.ds.val.x)[1].argmax(1))
            models[name] = (model, s)
            print(f"  [{t.regime.name}] tune {kind} {name}: val error {100 * record[kind][name][0]:.2f}%, "
                  f"NFR {100 * record[kind][name][1]:.2f}%", flush=True)
        record[f"{kind}_choice"] = choose(record[kind], plain_val[0])
        kept[method] = models[record[f"{kind}_choice"]]
    return record, kept


def run_regime(regime: Regime, seeds: list[int], methods: list[str], retune: bool) -> list[dict]:
    ds = _dataset(regime)
    print(f"[{regime.name}] {len(ds.train)} train pool, {len(ds.val)} validation, {len(ds.test)} test; "
          f"old {regime.old_arch.type} on {regime.old_samples or len(ds.train)}, new {regime.new_arch.type} on "
          f"{regime.new_samples or len(ds.train)}", flush=True)
    old = train_old(regime, ds)
    t = Trainer(regime, ds, old)
    tuning = merge_tuning(None)
    rows: list[dict] = []
    same_arch = regime.old_arch == regime.new_arch
    for seed in seeds:
        tuning_due = seed == 0 and (retune or regime.name not in tuning)
        ens = references(regime, seed) if tuning_due or any("ensemble" in m for m in methods) else None
        kept: dict[str, tuple] = {}
        if tuning_due:
            assert ens is not None
            record, kept = tune(t, ens)
            tuning = merge_tuning({regime.name: record})
        choice = tuning.get(regime.name, {})
        if not choice and {"fd_tuned", "ensemble_distill", "bcwi_ensemble"} & set(methods):
            raise SystemExit(f"{regime.name}: no tuned settings in {TUNING.name} yet: run seed 0 first")
        for m in methods:
            if m == "ensemble_served":
                assert ens is not None
                rows.append(t.row(m, seed, ens.test_logits.argmax(1), ens.seconds))
                continue
            if m.startswith("bcwi"):
                if not same_arch:
                    continue  # interpolation needs the old model's architecture
                if m == "bcwi":
                    model, secs, rec = t.bcwi(seed)
                else:
                    model, secs, rec = t.bcwi(seed, CompatSpec(ensemble=ENSEMBLE_GRID[choice["ensemble_choice"]]), ens)
                    secs += ens.seconds  # type: ignore[union-attr]
                rows.append(t.row(m, seed, predict(model, ds.test.x)[1].argmax(1), secs, alpha=rec["alpha"],
                                  weights_sha256=weights_sha256(model)))
                continue
            settings: dict = {}
            if m in kept:
                model, secs = kept[m]
            elif m == "plain":
                model, secs = t.fit(seed)
            elif m == "fd_official":
                model, secs = t.fit(seed, CompatSpec(focal_distillation=FD_OFFICIAL))
            elif m == "fd_tuned":
                model, secs = t.fit(seed, CompatSpec(focal_distillation=FD_GRID[choice["fd_choice"]]))
            elif m == "ensemble_distill":
                model, secs = t.fit(seed, CompatSpec(ensemble=ENSEMBLE_GRID[choice["ensemble_choice"]]), ens)
            else:
                raise ValueError(m)
            if m == "fd_tuned":
                settings["setting"] = choice["fd_choice"]
            if m == "ensemble_distill":
                settings["setting"] = choice["ensemble_choice"]
                secs += ens.seconds  # type: ignore[union-attr]
            rows.append(t.row(m, seed, predict(model, ds.test.x)[1].argmax(1), secs,
                              weights_sha256=weights_sha256(model), **settings))
        write_json(PATH, merge_rows(PATH, rows, _key))
    return rows


def merge_tuning(update: Optional[dict]) -> dict:
    import json

    cur = json.loads(TUNING.read_text()) if TUNING.is_file() else {}
    if update:
        cur.update(update)
        write_json(TUNING, cur)
    return cur


def _key(r: dict) -> tuple:
    return (r["regime"], r["method"], r["seed"])


def _se(v: np.ndarray) -> float:
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def table(rows: list[dict], regime: str) -> str:
    """Markdown for one regime: mean ± std over seeds (percent). The NFR change is the
    change of the mean NFR against plain's, mean(m) / mean(plain) - 1, ± its standard
    error from the per-seed paired differences, se(m - plain) / mean(plain); the error
    change is mean(m - plain) ± se."""
    rs = [r for r in rows if r["regime"] == regime]
    plain = {r["seed"]: r for r in rs if r["method"] == "plain"}
    out = ["| method | seeds | error % | NFR % | PFR % | NFI | NFR change vs plain (± s.e.) | error change (pt) | train s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        mr = sorted((r for r in rs if r["method"] == m), key=lambda r: r["seed"])
        if not mr:
            continue
        paired = [(r, plain[r["seed"]]) for r in mr if r["seed"] in plain]
        base = np.mean([p["nfr"] for _, p in paired]) if paired else 0.0
        if m == "plain" or not paired or base <= 0:
            change, derr = "–", "–"
        else:
            dn = np.array([r["nfr"] - p["nfr"] for r, p in paired])
            d = np.array([r["error"] - p["error"] for r, p in paired])
            change = f"{100 * dn.mean() / base:+.0f} % ± {100 * _se(dn) / base:.0f}"
            derr = f"{100 * d.mean():+.2f} ± {100 * _se(d):.2f}"
        nfis = [r["nfi"] for r in mr if r.get("nfi") is not None]
        label = m + (f" ({mr[0]['setting']})" if mr[0].get("setting") else "")
        out.append(f"| {label} | {len(mr)} | {mean_std(r['error'] for r in mr)} | {mean_std(r['nfr'] for r in mr)} | "
                   f"{mean_std(r['pfr'] for r in mr)} | {mean_std(nfis, 1, 3)} | {change} | {derr} | "
                   f"{mean_std((r['train_seconds'] for r in mr), 1, 0)} |")
    return "\n".join(out)


def verdict(rows: list[dict], regime: str) -> str:
    """Whether a single served model cuts mean NFR by >= 55 % against plain at no higher mean error."""
    rs = [r for r in rows if r["regime"] == regime]
    plain = [r for r in rs if r["method"] == "plain"]
    if not plain:
        return f"{regime}: target not evaluated (no plain rows)"
    n0, e0 = np.mean([r["nfr"] for r in plain]), np.mean([r["error"] for r in plain])
    best = []
    for m in METHODS[1:-1]:
        mr = [r for r in rs if r["method"] == m]
        if mr:
            n, e = np.mean([r["nfr"] for r in mr]), np.mean([r["error"] for r in mr])
            best.append((1 - n / n0, m, e <= e0))
    hits = [f"{m} (-{100 * c:.0f} %)" for c, m, ok in best if ok and c >= 0.55]
    top = max(((c, m) for c, m, ok in best if ok), default=None)
    if hits:
        return f"{regime}: target (single model, NFR -55 % at no higher error) MET by {', '.join(hits)}"
    return (f"{regime}: target (single model, NFR -55 % at no higher error) NOT MET; best at no higher error: "
            + (f"{top[1]} (-{100 * top[0]:.0f} %)" if top else "none"))


def plot(rows: list[dict]) -> None:
    regimes = [g for g in REGIMES if any(r["regime"] == g for r in rows)]
    if not regimes:
        return
    fig, axs = axes(len(regimes), (4.2 * len(regimes), 4.0))
    for ax, g in zip(axs, regimes):
        for m in METHODS:
            rs = [r for r in rows if r["regime"] == g and r["method"] == m]
            if not rs:
                continue
            e, n = 100 * np.array([r["error"] for r in rs]), 100 * np.array([r["nfr"] for r in rs])
            color = f"C{METHODS.index(m)}"  # the same method the same colour in every panel
            ax.scatter(e, n, alpha=0.3, s=12, color=color)
            ax.errorbar(e.mean(), n.mean(), xerr=e.std(), yerr=n.std(), fmt="o", capsize=3, color=color, label=m)
        test_rows = next(r["test_rows"] for r in rows if r["regime"] == g)
        ax.set_title(f"{g} ({test_rows:,} test rows)", fontsize=9)
        ax.set_xlabel("error of the new model (%)")
        ax.set_ylabel("NFR vs the old model (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_png(fig, PATH.with_suffix(".png"))


def main(argv: Optional[list[str]] = None) -> None:
    ap = seeds_parser(__doc__, [0, 1, 2, 3, 4])
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--retune", action="store_true", help="choose the tuned settings again (seed 0 must run)")
    ap.add_argument("--report", action="store_true", help="only print the tables and redraw the plot")
    args = ap.parse_args(argv)
    _with_example_path()
    torch.set_num_threads(2)
    if not args.report:
        if "plain" not in args.methods:
            args.methods = ["plain", *args.methods]
        for g in args.regimes:
            run_regime(REGIMES[g], args.seeds, args.methods, args.retune)
    all_rows = merge_rows(PATH, [], _key)
    for g in REGIMES:
        if any(r["regime"] == g for r in all_rows):
            print(f"\n{g}\n{table(all_rows, g)}\n{verdict(all_rows, g)}")
    plot(all_rows)


if __name__ == "__main__":
    main()
