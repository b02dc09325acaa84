"""The cost of compatibility training: seconds per epoch, plain vs FD + BCT (MNIST-1D).

The new model of benchmarks/nfr_pareto.py (CNN 32 channels, 12,000 samples, batch 128:
93 steps an epoch) trained plain and with Focal Distillation (KL, T 4) + BCT through the
frozen head of the old model (CNN 16 channels), in one process, alternating
plain/compat/uncached blocks of epochs so that drift of the machine hits all alike; the
median epoch of each is reported. The compatibility terms are the Ray Train loop's own
(`workers.train.make_extra_loss`), fed with old logits computed once before training
(`cache_s`) and the head as a frozen weight matrix. For contrast, `uncached_s` runs the
old model on every batch instead, which is what the cache avoids.

With `--ray`, the same two trainings also run through the real Ray Train path
(`workers.train.run_training`: 2 DDP workers with 1 CPU each, old logits computed by a Ray
task, checkpoint every epoch); seconds per epoch there are the median gaps between the
workers' per-epoch reports, start-up excluded (`ray_plain_s`, `ray_compat_s`, `ray_ratio`).

Writes benchmarks/results/train_overhead.json: {"plain_s", "compat_s", "ratio", ...}.
Target: ratio <= 1.15.

    flock /tmp/graceful-cpu.lock timeout 400 python -m benchmarks.train_overhead --rounds 7 --ray
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from benchmarks.common import RESULTS, cnn, mnist1d, train, write_json
from workers.checkpoint import save_model
from workers.losses import focal_distillation_loss, frozen_head
from workers.models import GracefulNet, build_model
from workers.specs import (BCTSpec, CompatSpec, DataSpec, FocalDistillationSpec, GenerationSpec, ScalingSpec,
                           TrainSpec)
from workers.train import CompatTargets, ConstraintModel, TrainJob, make_extra_loss, run_training
from workers.training import fit, predict

PATH = RESULTS / "train_overhead.json"
COMPAT = CompatSpec(bct=BCTSpec(weight=1.0),
                    focal_distillation=FocalDistillationSpec(form="kl", alpha=0, beta=1, temperature=4, weight=1))


def ray_train_epochs(old: GracefulNet, epochs: int) -> dict[str, float]:
    """Median seconds per epoch of plain and FD+BCT training on Ray Train (2 workers)."""
    import ray

    data = DataSpec(source="mnist1d", num_samples=25_000, test_fraction=0.4, val_fraction=0.02)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        sha = save_model(old, Path(tmp) / "old")
        parent = ConstraintModel("old", str(Path(tmp) / "old"), sha)
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            for kind, compat in (("plain", CompatSpec()), ("compat", COMPAT)):
                gen = GenerationSpec(name=f"overhead-{kind}", arch=cnn(32), train_fraction=12_000 / 14_500,
                                     compat=compat, train=TrainSpec(steps=epochs * 93, eval_every=93, seed=1))
                job = TrainJob(generation=gen, data=data, scaling=ScalingSpec(num_workers=2, max_failures=0),
                               out_dir=str(Path(tmp) / kind), storage_path=str(Path(tmp) / "ray"),
                               run_name=kind, production=parent, bct=(parent,), verbose=False)
                history = run_training(job, log=lambda s: None).metrics["history"]
                gaps = np.diff([h["seconds"] for h in history])[1:]  # the first epoch warms up
                out[kind] = float(np.median(gaps))
                print(f"Ray Train {kind}: {out[kind]:.3f} s/epoch over {len(gaps)} epochs", flush=True)
        finally:
            ray.shutdown()
    return out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per timed block")
    ap.add_argument("--rounds", type=int, default=5, help="blocks of each kind, alternating")
    ap.add_argument("--ray", action="store_true", help="also measure on Ray Train (2 DDP workers)")
    ap.add_argument("--ray-epochs", type=int, default=6)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    ds = mnist1d(25_000, 0.4)
    data = ds.train.take(12_000)
    per_epoch = len(data) // 128
    old, _ = train(cnn(16), ds.train.take(2_000), ds.input_dim, ds.num_classes,
                   TrainSpec(steps=3000, batch_size=128, seed=0))
    t0 = time.perf_counter()
    targets = CompatTargets(heads=[frozen_head(old, "old")], old_logits=predict(old, data.x)[1])
    cache_s = time.perf_counter() - t0
    cached = make_extra_loss(COMPAT, targets)
    bct_only = make_extra_loss(CompatSpec(bct=COMPAT.bct), targets)
    fd = COMPAT.focal_distillation
    old.eval()

    def uncached(model, x, y, idx, z, logits):
        with torch.no_grad():
            old_logits = old(x)  # what the cache saves: the old model on every batch
        return bct_only(model, x, y, idx, z, logits) + fd.weight * focal_distillation_loss(
            logits, old_logits, y, fd.form, fd.alpha, fd.beta, fd.temperature)

    spec = TrainSpec(steps=args.epochs * per_epoch, batch_size=128, seed=1, schedule="constant")
    times: dict[str, list[float]] = {"plain": [], "compat": [], "uncached": []}
    model = build_model(cnn(32), ds.input_dim, ds.num_classes)
    fit(model, data, spec.model_copy(update={"steps": per_epoch}))  # warm-up, not timed
    for r in range(args.rounds):
        for kind, extra in (("plain", None), ("compat", cached), ("uncached", uncached)):
            torch.manual_seed(r)
            model = build_model(cnn(32), ds.input_dim, ds.num_classes)
            t = time.perf_counter()
            fit(model, data, spec, extra_loss=extra)
            times[kind].append((time.perf_counter() - t) / args.epochs)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.3f} s/epoch" for k, v in times.items()),
              flush=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    out = {"plain_s": round(med["plain"], 4), "compat_s": round(med["compat"], 4),
           "ratio": round(med["compat"] / med["plain"], 4),
           "uncached_s": round(med["uncached"], 4), "uncached_ratio": round(med["uncached"] / med["plain"], 4),
           "cache_s": round(cache_s, 4), "steps_per_epoch": per_epoch, "epochs_per_block": args.epochs,
           "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    print(f"| plain s/epoch | FD+BCT (cached) s/epoch | ratio | FD+BCT running the old model s/epoch | ratio | "
          f"caching old logits once |\n|---|---|---|---|---|---|\n| {out['plain_s']:.3f} | {out['compat_s']:.3f} | "
          f"{out['ratio']:.3f} | {out['uncached_s']:.3f} | {out['uncached_ratio']:.3f} | {out['cache_s']:.2f} s |")
    if args.ray:
        r = ray_train_epochs(old, args.ray_epochs)
        out.update(ray_plain_s=round(r["plain"], 4), ray_compat_s=round(r["compat"], 4),
                   ray_ratio=round(r["compat"] / r["plain"], 4), ray_epochs=args.ray_epochs)
        print(f"Ray Train, 2 DDP workers: plain {out['ray_plain_s']:.3f} s/epoch, FD+BCT {out['ray_compat_s']:.3f} "
              f"s/epoch, ratio {out['ray_ratio']:.3f}")
    print(f"target ratio <= 1.15: {'met' if out['ratio'] <= 1.15 else 'NOT MET'}")
    write_json(PATH, out)


if __name__ == "__main__":
    main()
