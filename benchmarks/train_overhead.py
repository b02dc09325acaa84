"""The cost of compatibility training: seconds per epoch, plain vs FD + BCT (MNIST-1D).

The new model of benchmarks/nfr_pareto.py (CNN 32 channels, 12,000 samples, batch 128:
93 steps an epoch) trained plain and with Focal Distillation (KL, T 4) + BCT through the
frozen head of the old model (CNN 16 channels), in one process, alternating
plain/compat/uncached blocks of epochs so that drift of the machine hits all alike; the
median epoch of each is reported. The compatibility terms are the Ray Train loop's own
(`workers.train.make_extra_loss`), fed with old logits computed once before training
(`cache_s`) and the head as a frozen weight matrix. For contrast, `uncached_s` runs the
old model on every batch instead, which is what the cache avoids.

Writes benchmarks/results/train_overhead.json: {"plain_s", "compat_s", "ratio", ...}.
Target: ratio <= 1.15.

    flock /tmp/graceful-cpu.lock timeout 300 python -m benchmarks.train_overhead
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Optional

import numpy as np
import torch

from benchmarks.common import RESULTS, cnn, mnist1d, train, write_json
from workers.losses import focal_distillation_loss, frozen_head
from workers.models import build_model
from workers.specs import BCTSpec, CompatSpec, FocalDistillationSpec, TrainSpec
from workers.train import CompatTargets, make_extra_loss
from workers.training import fit, predict

PATH = RESULTS / "train_overhead.json"
COMPAT = CompatSpec(bct=BCTSpec(weight=1.0),
                    focal_distillation=FocalDistillationSpec(form="kl", alpha=0, beta=1, temperature=4, weight=1))


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per timed block")
    ap.add_argument("--rounds", type=int, default=5, help="blocks of each kind, alternating")
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
    print(f"target ratio <= 1.15: {'met' if out['ratio'] <= 1.15 else 'NOT MET'}")
    write_json(PATH, out)


if __name__ == "__main__":
    main()
