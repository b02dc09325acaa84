"""Retrieval at catalogue scale: every index kind of `serving.index` on galleries of
10^4, 10^5 and 10^6 vectors.

Vectors: 64-d, L2-normalised, drawn from a mixture of 1,000 Gaussian clusters (centres
uniform on the sphere, noise 0.5 of the centre's length per dimension group), the shape
of a catalogue embedded by one model; queries are 1,000 fresh draws from the same
mixture (not gallery items). For each (index kind, n): build seconds (faiss on every
core, IVF training included), memory (bytes of the serialised index), search latency p50
and p99 per query (one query at a time, faiss on ONE thread, 1,000 queries after 50 warm
ones) and recall@10 against exact search (`flat`) on the same queries.

Index settings (`retrieval.index` keys, docs/serving.md): flat; ivf nlist = about 4 sqrt(n),
nprobe 32; ivfpq the same with 16 bytes a vector (pq_m 16, 8 bits); hnsw M 32,
efConstruction 80, efSearch 128.

Rows {"index", "n", "p50_ms", "p99_ms", "recall_at_10", "build_s", "memory_mb"} go to
benchmarks/results/retrieval_scale.json (merged by (index, n)).

Throughput (`--parts throughput`), rows {"stage", "workers", "n", "seconds",
"items_per_s"} in benchmarks/results/retrieval_throughput.json:
  embed      the catalogue builder's `workers.embedding.embed_items`: n MNIST-1D-shaped
             items (40 values) through the benchmarks' CNN (width 32, 64-d), in process
             (workers 0) and as Ray Data batch inference with 1 and 2 actors on a local
             Ray of 2 CPUs (Ray start-up not counted; actor start-up counted)
  transform  `workers.transform.apply_transform` of 10^6 64-d vectors (h fitted on 10,000
             pairs, hidden 256), torch on every core (workers = torch threads)

    python -m benchmarks.retrieval_scale                      # 10^4, 10^5, 10^6, every kind
    python -m benchmarks.retrieval_scale --sizes 10000 --kinds flat hnsw
    python -m benchmarks.retrieval_scale --parts throughput   # about 2 minutes
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import numpy as np

from benchmarks.common import RESULTS, merge_rows, write_json
from serving.index import INDEX_TYPES, IndexSpec, build, memory_bytes, search

PATH = RESULTS / "retrieval_scale.json"
THROUGHPUT = RESULTS / "retrieval_throughput.json"
DIM, CLUSTERS, QUERIES, WARMUP, K = 64, 1000, 1000, 50, 10
SPECS = {
    "flat": IndexSpec(type="flat"),
    "ivf": IndexSpec(type="ivf", nprobe=32),
    "ivfpq": IndexSpec(type="ivfpq", nprobe=32, pq_m=16, pq_bits=8),
    "hnsw": IndexSpec(type="hnsw", hnsw_m=32, ef_construction=80, ef_search=128),
}


def mixture(n: int, seed: int, centres: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(n unit vectors, the centres) of the cluster mixture; generated in chunks."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.normal(size=(CLUSTERS, DIM)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, DIM), np.float32)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        x = centres[rng.integers(0, CLUSTERS, m)] + rng.normal(scale=0.5 / np.sqrt(DIM), size=(m, DIM))
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, centres


def latencies_ms(index, queries: np.ndarray) -> np.ndarray:
    for q in queries[:WARMUP]:
        search(index, q[None], K)
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        search(index, q[None], K)
        out[i] = 1000 * (time.perf_counter() - t0)
    return out


def run(n: int, kinds: list[str], threads: int) -> list[dict]:
    import faiss

    gallery, centres = mixture(n, seed=n)
    queries, _ = mixture(QUERIES, seed=1, centres=centres)
    ids = np.arange(n, dtype=np.int64)
    exact: Optional[np.ndarray] = None
    rows = []
    for kind in ["flat"] + [k for k in kinds if k != "flat"]:
        faiss.omp_set_num_threads(threads)
        t0 = time.perf_counter()
        index = build(SPECS[kind], gallery, ids)
        build_s = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        _, found = search(index, queries, K)
        if kind == "flat":
            exact = found
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact)]))  # type: ignore[arg-type]
        lat = latencies_ms(index, queries)
        row = {"index": kind, "n": n, "p50_ms": round(float(np.percentile(lat, 50)), 4),
               "p99_ms": round(float(np.percentile(lat, 99)), 4), "recall_at_10": round(recall, 4),
               "build_s": round(build_s, 2), "memory_mb": round(memory_bytes(index) / 2**20, 1),
               "build_threads": threads, "settings": SPECS[kind].model_dump(exclude_defaults=True)}
        if kind in kinds:
            rows.append(row)
        print(f"n={n:>9,} {kind:6s} build {build_s:7.1f}s  {row['memory_mb']:8.1f} MiB  p50 {row['p50_ms']:.3f} ms  "
              f"p99 {row['p99_ms']:.3f} ms  recall@10 {recall:.3f}", flush=True)
        del index
    return rows


def throughput(n_embed: int, n_transform: int) -> list[dict]:
    """Rows of the embed and transform stages (module docstring)."""
    import ray
    import torch

    from benchmarks.common import cnn
    from workers.checkpoint import MODEL_FILE, save_model
    from workers.embedding import embed_items
    from workers.models import build_model
    from workers.transform import apply_transform, fit_transform

    rows = []

    def row(stage: str, workers: int, n: int, seconds: float) -> None:
        rows.append({"stage": stage, "workers": workers, "n": n, "seconds": round(seconds, 2),
                     "items_per_s": round(n / seconds)})
        print(f"{stage:9s} workers {workers}  n {n:>9,}  {seconds:7.1f}s  {n / seconds:>10,.0f} items/s", flush=True)

    import tempfile

    torch.manual_seed(0)
    model = build_model(cnn(32), 40, 10)
    x = np.random.default_rng(0).normal(size=(n_embed, 40)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        sha = save_model(model, d)
        uri = f"{d}/{MODEL_FILE}"
        t0 = time.perf_counter()
        embed_items(x, uri, sha, batch_size=1024)
        row("embed", 0, n_embed, time.perf_counter() - t0)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            for workers in (1, 2):
                t0 = time.perf_counter()
                embed_items(x, uri, sha, workers=workers, batch_size=1024)
                row("embed", workers, n_embed, time.perf_counter() - t0)
        finally:
            ray.shutdown()
    rng = np.random.default_rng(1)
    old = rng.normal(size=(10_000, DIM)).astype(np.float32)
    h = fit_transform(old, np.tanh(old @ rng.normal(size=(DIM, DIM)).astype(np.float32)), steps=200)
    vectors, _ = mixture(n_transform, seed=2)
    t0 = time.perf_counter()
    apply_transform(h, vectors)
    row("transform", torch.get_num_threads(), n_transform, time.perf_counter() - t0)
    return rows


def throughput_table(rows: list[dict]) -> str:
    out = ["| stage | workers | items | seconds | items/s | target |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        target = "–"
        if r["stage"] == "transform":
            per_million = r["seconds"] * 1e6 / r["n"]
            target = f"{per_million:.1f} s per 10^6 " + ("(<= 60 s: met)" if per_million <= 60 else "(**missed**)")
        out.append(f"| {r['stage']} | {r['workers']} | {r['n']:,} | {r['seconds']:.1f} | {r['items_per_s']:,} | {target} |")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    out = ["| index | n | build s | memory MiB | p50 ms | p99 ms | recall@10 | target at 10^6 (p50 <= 5 ms, recall >= 0.95) |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (INDEX_TYPES.index(r["index"]), r["n"])):
        target = "–"
        if r["n"] == 1_000_000:
            target = "met" if r["p50_ms"] <= 5 and r["recall_at_10"] >= 0.95 else "**missed**"
        out.append(f"| {r['index']} | {r['n']:,} | {r['build_s']:.1f} | {r['memory_mb']:.1f} | {r['p50_ms']:.3f} | "
                   f"{r['p99_ms']:.3f} | {r['recall_at_10']:.3f} | {target} |")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--kinds", nargs="+", default=list(INDEX_TYPES), choices=list(INDEX_TYPES))
    ap.add_argument("--build-threads", type=int, default=2, help="faiss threads while building (search: 1)")
    ap.add_argument("--parts", nargs="+", default=["index"], choices=["index", "throughput"])
    ap.add_argument("--embed-items", type=int, default=200_000, help="throughput: items embedded per setting")
    ap.add_argument("--transform-vectors", type=int, default=1_000_000, help="throughput: vectors transformed")
    ap.add_argument("--report", action="store_true", help="only print the tables of the stored rows")
    args = ap.parse_args(argv)
    key = lambda r: (r["index"], r["n"])  # noqa: E731
    if not args.report and "index" in args.parts:
        for n in args.sizes:
            rows = run(n, args.kinds, args.build_threads)
            write_json(PATH, merge_rows(PATH, rows, key))
    if not args.report and "throughput" in args.parts:
        write_json(THROUGHPUT, throughput(args.embed_items, args.transform_vectors))
    print(table(merge_rows(PATH, [], key)))
    if THROUGHPUT.is_file():
        import json

        print()
        print(throughput_table(json.loads(THROUGHPUT.read_text())))


if __name__ == "__main__":
    main()
