"""Train a tiny chain on scikit-learn digits in this process, evaluate it and write the
sample report committed under docs/sample-report/ (issue 7).

Three generations like config/quick.yaml: g0 on 10% of the training pool; g1 wider, on
all of it, trained with BCT (weight 2) and Focal Distillation against g0 (it passes the
gate, BCT criterion included); g2 trained on 40% noisy labels (it fails). Training is the single-process `workers.training.fit` with the same
compatibility terms the Ray Train workers add (`train_in_process`, a drop-in for
`workers.train.run_training` that writes the same model.pt and metrics.json), so this
needs no Ray; then `graceful evaluate` records and reports as usual.

    .venv/bin/python -m benchmarks.sample_report            # -> docs/sample-report/
    .venv/bin/python -m benchmarks.sample_report --run-dir /tmp/sr --out /tmp/sr-docs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from workers.checkpoint import save_model
from workers.data import fingerprint, generation_data, load_dataset
from workers.models import build_model
from workers.train import (CompatTargets, TrainJob, TrainResult, _logits_of, constraint_head, constraint_records,
                           make_extra_loss)
from workers.training import accuracy, fit

ROOT = Path(__file__).resolve().parents[1]

SAMPLE_CONFIG = {
    "data": {"source": "digits", "seed": 0, "test_fraction": 0.3, "val_fraction": 0.1},
    "generations": [
        {"name": "g0", "train_fraction": 0.1, "arch": {"type": "mlp", "width": 32, "depth": 2, "embed_dim": 32},
         "train": {"steps": 200, "batch_size": 64, "eval_every": 100}},
        {"name": "g1", "arch": {"type": "mlp", "width": 64, "depth": 2, "embed_dim": 32},
         "train": {"steps": 300, "batch_size": 64, "eval_every": 100, "seed": 1},
         "compat": {"bct": {"weight": 2.0}, "focal_distillation": {"weight": 1.0}}},
        {"name": "g2", "label_noise": 0.4, "arch": {"type": "mlp", "width": 64, "depth": 2, "embed_dim": 32},
         "train": {"steps": 300, "batch_size": 64, "eval_every": 100, "seed": 2}},
    ],
    "gates": {"max_error_increase": 0.01, "max_nfr": 0.02, "max_class_nfr": 0.1, "require_bct": True},
}


def train_in_process(job: TrainJob, log: Callable[[str], None] = print) -> TrainResult:
    """`run_training` without Ray: same targets, loss, checkpoint and metrics.json."""
    gen = job.generation
    if gen.recipe == "lqf" or gen.compat.ensemble is not None:
        raise ValueError(f"{gen.name}: train_in_process covers plain recipes with BCT/FD only")
    t0 = time.time()
    ds = load_dataset(job.data)
    split, classes = generation_data(ds, gen)
    targets = CompatTargets()
    if gen.compat.bct is not None:
        targets.heads = [constraint_head(c) for c in job.bct]
    if gen.compat.focal_distillation is not None and job.production is not None:
        targets.old_logits = _logits_of(job.production, split.x)
    torch.manual_seed(gen.train.seed)
    model = build_model(gen.arch, ds.input_shape, classes)
    history: list[dict] = []
    fit(model, split, gen.train, extra_loss=make_extra_loss(gen.compat, targets), val=ds.val, log=history.append)
    meta = {"generation": gen.name, "parent": job.production.name if job.production else None}
    sha = save_model(model, job.out_dir, meta)
    metrics = {
        "name": gen.name, "parent": meta["parent"], "sha256": sha, "recipe": gen.recipe,
        "config_hash": job.config_hash, "train_seconds": round(time.time() - t0, 2),
        "val_accuracy": history[-1].get("val_accuracy") if history else None,
        "test_accuracy": accuracy(model, ds.test), "history": history, "resumed_from_step": None,
        "data_fingerprint": fingerprint(split), "train_samples": len(split),
        "constraints": constraint_records(job), "scaling": {"in_process": True},
    }
    out = Path(job.out_dir)
    (out / ".metrics.json.tmp").write_text(json.dumps(metrics, indent=2))
    os.replace(out / ".metrics.json.tmp", out / "metrics.json")
    log(f"[{gen.name}] trained in process in {metrics['train_seconds']:.1f}s: test_acc {metrics['test_accuracy']:.4f}")
    return TrainResult(gen.name, str(out / "model.pt"), sha, metrics)


def write_config(run_dir: Path) -> Path:
    """The sample chain's config file, in `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "sample.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(run_dir.resolve()), **SAMPLE_CONFIG}, sort_keys=False))
    return path


def train_chain(config: Path, log: Callable[[str], None] = print) -> None:
    """Train every generation of `config` in process and record each in the registry,
    as `graceful train` does."""
    from orchestrator.chain import build_job
    from orchestrator.config import load_config
    from orchestrator.registry import register_trained

    cfg = load_config(config)
    for g in cfg.generations:
        train_in_process(build_job(cfg, g.name, verbose=False), log)
        register_trained(cfg, g.name, actor="train")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "sample-report"))
    p.add_argument("--out", default=str(ROOT / "docs" / "sample-report"))
    args = p.parse_args()
    from orchestrator.cli import main as graceful

    run_dir = Path(args.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = write_config(run_dir)
    train_chain(config)
    codes = {c: graceful(["evaluate", str(config), "--candidate", c]) for c in ("g1", "g2")}
    print(f"exit codes: {codes}")
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run_dir / "reports", out)
    print(f"sample reports in {out}")


if __name__ == "__main__":
    main()
