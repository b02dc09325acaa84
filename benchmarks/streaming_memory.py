"""Peak memory of the driver and of each Ray Train worker as the dataset grows 10x:
streamed (`data.source: ray`) against in memory (`data.source: custom`), same rows.

One generation is trained through the real path (`workers.train.run_training`: 2 DDP
workers of 1 CPU, Focal Distillation against an old model, so the old model's logits are
computed too: by a Ray Data actor on the stream, by a Ray task over the whole training
split in memory) on N and on 10N rows of `--dim` float32 values and 10 classes, generated
as a pure function of the row id (`lazy_rows`: `ray.data.range(n).map_batches(...)`,
blocks of 10,000 rows; `memory_rows`: the same rows as arrays). Every run takes the same
number of steps, enough for the 10N run to read each training row once. The old model is
an untrained network of the same architecture: what it costs to run, not what it knows,
matters here.

Each run is a fresh process with its own local Ray (4 logical CPUs on this 2-core machine:
2 for the workers, the rest for Ray Data's read tasks and the old model's actor).
Measured: the driver's peak RSS (getrusage, the whole process: imports, Ray, loading the
eval splits or the whole dataset, training, saving), its RSS after `ray.init` (baseline),
and each worker's peak RSS as metrics.json records it (`worker_peak_rss_mb`). Ray Data's
own processes (read tasks, the split coordinator, the old model's actor) and the object
store are not counted.

Writes benchmarks/results/streaming_memory.json (one row per run).

    flock /tmp/graceful-cpu.lock timeout 900 python -m benchmarks.streaming_memory
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_json
from tests.fixtures_streaming import splitmix_uniform  # the same row hash as the tests' streamed data

PATH = RESULTS / "streaming_memory.json"
CLASSES = 10
BLOCK_ROWS = 10_000


# --- the data: a pure function of the row id ------------------------------------------------

def make_rows(ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows `ids`: class id % 10, x a class prototype plus uniform noise (float32, (N, dim))."""
    ids = np.asarray(ids, dtype=np.int64)
    y = ids % CLASSES
    protos = np.random.default_rng(7).standard_normal((CLASSES, dim))
    k = ids[:, None].astype(np.uint64) * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None, :]
    x = protos[y] + 1.5 * (2.0 * splitmix_uniform(k) - 1.0)
    return x.astype(np.float32), y


def _batch(batch: dict, dim: int) -> dict:
    x, y = make_rows(batch["id"], dim)
    return {"x": x, "y": y}


def lazy_rows(n: int, dim: int = 64):
    """`data.source: ray` factory: n rows generated as Ray Data reads them."""
    import ray.data

    return ray.data.range(n, override_num_blocks=max(1, math.ceil(n / BLOCK_ROWS))).map_batches(
        _batch, fn_kwargs={"dim": dim}, batch_format="numpy")


def memory_rows(n: int, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """`data.source: custom` factory: the same n rows as arrays."""
    return make_rows(np.arange(n), dim)


# --- one run (a fresh process) ----------------------------------------------------------------

def one_run(mode: str, n: int, dim: int, steps: int, batch: int, cpus: int) -> dict:
    import ray

    from workers.checkpoint import save_model
    from workers.models import build_model
    from workers.specs import (ArchSpec, CompatSpec, DataSpec, FocalDistillationSpec, GenerationSpec, ScalingSpec,
                               TrainSpec)
    from workers.train import ConstraintModel, TrainJob, peak_rss_mb, run_training

    t0 = time.time()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    baseline = peak_rss_mb()
    data = DataSpec(source=mode, factory=f"benchmarks.streaming_memory:{'lazy_rows' if mode == 'ray' else 'memory_rows'}",
                    kwargs={"n": n, "dim": dim}, num_classes=CLASSES)
    arch = ArchSpec(type="mlp", width=64, depth=2, embed_dim=32)
    with tempfile.TemporaryDirectory() as tmp:
        old = build_model(arch, (dim,), CLASSES)
        sha = save_model(old, Path(tmp) / "g0", {"generation": "g0"})
        gen = GenerationSpec(name="g1", arch=arch, train=TrainSpec(steps=steps, batch_size=batch, eval_every=steps),
                             compat=CompatSpec(focal_distillation=FocalDistillationSpec(weight=1.0)))
        job = TrainJob(generation=gen, data=data, scaling=ScalingSpec(num_workers=2, max_failures=0),
                       out_dir=str(Path(tmp) / "g1"), storage_path=str(Path(tmp) / "ray"), run_name="g1",
                       production=ConstraintModel("g0", str(Path(tmp) / "g0"), sha), verbose=False)
        t_train = time.time()
        m = run_training(job, log=lambda _: None).metrics
        train_s = time.time() - t_train
    ray.shutdown()
    return {"mode": mode, "rows": n, "dim": dim, "steps": steps, "batch_size": batch,
            "dataset_mib": round(n * (dim * 4 + 8) / 2 ** 20, 1),
            "train_rows_read": m["train_samples"], "streamed": m["streamed"],
            "driver_baseline_mib": baseline, "driver_peak_mib": peak_rss_mb(),
            "worker_peak_mib": m["worker_peak_rss_mb"], "test_accuracy": round(m["test_accuracy"], 4),
            "train_s": round(train_s, 1), "total_s": round(time.time() - t0, 1)}


# --- the benchmark -----------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    out = ["| source | rows | dataset MiB | driver peak MiB (after ray.init) | worker peak MiB (rank 0, 1) | "
           "train s | test acc |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        workers = ", ".join(f"{w:.0f}" for w in r["worker_peak_mib"])
        out.append(f"| {'ray (streamed)' if r['mode'] == 'ray' else 'custom (in memory)'} | {r['rows']:,} | "
                   f"{r['dataset_mib']:.0f} | {r['driver_peak_mib']:.0f} ({r['driver_baseline_mib']:.0f}) | "
                   f"{workers} | {r['train_s']:.0f} | {r['test_accuracy']:.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="N: the small dataset (the large one is 10N)")
    ap.add_argument("--scale", type=int, default=10, help="the large dataset is scale x N rows")
    ap.add_argument("--dim", type=int, default=64, help="values per row (float32)")
    ap.add_argument("--batch", type=int, default=1024, help="global batch (train.batch_size)")
    ap.add_argument("--cpus", type=int, default=4, help="logical CPUs of each run's local Ray")
    ap.add_argument("--modes", nargs="+", default=["ray", "custom"], choices=["ray", "custom"])
    ap.add_argument("--no-save", action="store_true", help="print the table, leave the JSON alone")
    ap.add_argument("--one", nargs=2, metavar=("MODE", "ROWS"), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one_run(args.one[0], int(args.one[1]), args.dim, args.steps, args.batch,
                                             args.cpus)), flush=True)
        return 0
    big = args.rows * args.scale
    # Steps for the large run to read (about) each training row once: 70 % of rows train.
    steps = max(1, math.ceil(0.7 * big / args.batch))
    rows = []
    for mode in args.modes:
        for n in (args.rows, big):
            cmd = [sys.executable, "-m", "benchmarks.streaming_memory", "--one", mode, str(n), "--steps", str(steps),
                   "--dim", str(args.dim), "--batch", str(args.batch), "--cpus", str(args.cpus)]
            print(f"{mode} {n:,} rows, {steps} steps ...", flush=True)
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            got = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
            if p.returncode != 0 or not got:
                print(p.stdout[-3000:], p.stderr[-3000:], sep="\n", file=sys.stderr)
                raise SystemExit(f"run {mode} {n} failed (exit {p.returncode})")
            rows.append(json.loads(got[-1][len("RESULT "):]))
            print(f"  driver peak {rows[-1]['driver_peak_mib']:.0f} MiB, workers {rows[-1]['worker_peak_mib']}, "
                  f"{rows[-1]['train_s']:.0f} s", flush=True)
    print(table(rows))
    if not args.no_save:
        write_json(PATH, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
