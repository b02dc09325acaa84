"""The prediction log under load: label import throughput, and the router's memory under a flood.

(1) import: for each durable store, sqlite (a file in a temporary directory, the default
    store) and redis (a real redis-server this script starts on a free port of 127.0.0.1,
    no persistence; the row is skipped, and the table says so, where redis-server is not
    installed), N requests (`--import-requests`) of the router's shape are logged through
    the store's own `record` (uuid4 request ids, production g0 and one candidate g1, 4
    rows each, int32 class ids), then flushed: `records/s` is N over the time from the
    first `record` to `flush` returning (the writer thread's group commits included). A
    label file with all N request ids (4 labels each) is written as JSONL and as Parquet
    (Parquet only where pyarrow imports), and the log is closed. Then, as `graceful labels
    import CONFIG FILE` does it, the log is opened again and `read_labels` +
    `import_labels` (batches of 5,000) run on it: `labels/s` is the requests joined over
    that whole time, file reading and checking included. Every request must join (the
    script fails loudly otherwise), none may be dropped by the writer. Each (store,
    format) gets a fresh store, `--repeats` times; the table shows medians, the JSON every
    run. Target: >= 20,000 labels/s.
(2) flood: in a fresh process (so RSS holds nothing of part 1), a `MemoryLog` with a
    byte cap (`--memory-cap-mb`) and a retention of 7 days takes `--flood` requests of
    the same shape, one `record` after another, uuid4 ids; VmRSS (/proc/self/status) is
    read after the imports and the log's creation (start), every `--sample-every`
    requests, and when the cap first prunes. "Flat": RSS at the end minus RSS at the
    first sample where the cap had been reached (`rss_growth_after_cap_mb`) is near 0,
    and so is RSS at the end minus RSS at half the flood (`rss_growth_second_half_mb`).
    The same flood goes into a `SqliteLog` with its byte cap (`--sqlite-cap-mb`) in
    another fresh process, flushed every `max_pending / 2` requests so that nothing is
    dropped (skipped with `--no-sqlite-flood`; given up after `--sqlite-flood-timeout-s`).
    Its cap is applied by the writer's prune every 5 s, so the file overshoots it by what
    came in since; its RSS includes up to `max_pending / 2` queued requests.

MB here are MiB (2**20 bytes). The JSON's top level holds `import_labels_per_s` (the
median of sqlite/jsonl, named by `import_labels_per_s_of`), `rss_mb_start` and
`rss_mb_after` (the memory log, before the first and after the last of the flood),
`rss_growth_after_cap_mb` and `rss_growth_second_half_mb`; details under `import`, `flood` and `meta`.

    flock /tmp/graceful-cpu.lock .venv/bin/python benchmarks/prediction_log.py
    .venv/bin/python benchmarks/prediction_log.py --quick     # smoke run: writes /tmp/prediction_log_quick.json

Writes benchmarks/results/prediction_log.json (`--out`) and prints a Markdown table. The
default run takes about 2 to 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.redis_server import RedisServer  # noqa: E402  (the tests' real redis-server starter)

OUT = ROOT / "benchmarks/results/prediction_log.json"
QUICK_OUT = Path("/tmp/prediction_log_quick.json")
TARGET_LABELS_PER_S = 20_000
ROWS = 4               # rows per request, as in serving_overhead
CLASSES = 10
RETENTION_S = 7 * 86400.0
GENS = {"g0": "a" * 64, "g1": "b" * 64}   # generation -> checkpoint sha256
IMPORT_BATCH = 5000    # `graceful labels import --batch-size` default


# --- small helpers -----------------------------------------------------------------------

def rss_mb() -> float:
    """This process's resident set (VmRSS), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not in /proc/self/status")


def _have_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


# --- (1) import throughput -----------------------------------------------------------------

def _traffic(n: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(request ids, predictions (n, 2, ROWS) int32 of g0 and g1, labels (n, ROWS)).
    g1 agrees with g0 on ~90% of rows; labels agree with g0 on ~80%."""
    rng = np.random.default_rng(seed)
    rids = [uuid.uuid4().hex for _ in range(n)]
    p0 = rng.integers(0, CLASSES, (n, ROWS), dtype=np.int32)
    p1 = np.where(rng.random((n, ROWS)) < 0.9, p0, rng.integers(0, CLASSES, (n, ROWS), dtype=np.int32))
    y = np.where(rng.random((n, ROWS)) < 0.8, p0, rng.integers(0, CLASSES, (n, ROWS), dtype=np.int32))
    return rids, np.stack([p0, p1], 1).astype(np.int32), y.astype(np.int64)


def _write_labels(path: Path, fmt: str, rids: list[str], y: np.ndarray) -> None:
    labels = y.tolist()
    if fmt == "jsonl":
        with path.open("w", encoding="utf-8") as f:
            for rid, lab in zip(rids, labels):
                f.write(json.dumps({"request_id": rid, "labels": lab}) + "\n")
    elif fmt == "csv":
        with path.open("w", encoding="utf-8") as f:
            f.write("request_id,labels\n")
            for rid, lab in zip(rids, labels):
                f.write(f"{rid},{' '.join(map(str, lab))}\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"request_id": pa.array(rids, pa.string()),
                                 "labels": pa.array(labels, pa.list_(pa.int32()))}), path)
    else:
        raise ValueError(fmt)


def _open(store: str, where: Any):
    """A log of `store` as `graceful labels import` opens one (7 days, 1 GiB: the spec's defaults)."""
    if store == "sqlite":
        from serving.predlog.sqlite import SqliteLog

        return SqliteLog(where, RETENTION_S, 1 << 30)
    from serving.predlog.redis import RedisLog

    return RedisLog(where, RETENTION_S, 1 << 30)


def _log_requests(log, rids: list[str], preds: np.ndarray) -> float:
    """Record every request through `log.record`, then flush; seconds from the first record
    to the flush returning. Flushed every max_pending / 2 too, so nothing is dropped."""
    every = max(1, log.max_pending // 2)
    t0 = time.perf_counter()
    for i, rid in enumerate(rids):
        p = preds[i]
        log.record(rid, "g0", {"g0": (GENS["g0"], p[0]), "g1": (GENS["g1"], p[1])})
        if (i + 1) % every == 0 and not log.flush(timeout_s=300):
            raise RuntimeError(f"{log.kind}: flush timed out after 300 s")
    if not log.flush(timeout_s=300):
        raise RuntimeError(f"{log.kind}: flush timed out after 300 s")
    secs = time.perf_counter() - t0
    d = log.describe()
    if d["dropped"] or d["write_errors"]:
        raise RuntimeError(f"{log.kind}: the writer dropped {d['dropped']} requests, {d['write_errors']} "
                           f"write errors ({d['last_error']}): the figures would be wrong")
    return secs


def _import_once(store: str, fmt: str, n: int, seed: int, tmp: Path, server: Optional[RedisServer]) -> dict:
    from serving.predlog.labels import import_labels, read_labels

    rids, preds, y = _traffic(n, seed)
    if store == "sqlite":
        where: Any = tmp / f"predictions-{fmt}-{seed}.sqlite"
    else:
        import redis

        with redis.Redis.from_url(server.url) as r:
            r.flushall()
        where = server.url
    log = _open(store, where)
    try:
        record_s = _log_requests(log, rids, preds)
    finally:
        log.close()
    path = tmp / f"labels-{seed}.{fmt}"
    _write_labels(path, fmt, rids, y)
    file_mb = path.stat().st_size / 2**20

    # `graceful labels import`: read and check the whole file, open the log, join in batches
    t0 = time.perf_counter()
    items = read_labels(path)
    t_read = time.perf_counter()
    log = _open(store, where)
    try:
        summary = import_labels(log, items, batch_size=IMPORT_BATCH)
        t1 = time.perf_counter()
        counters, feedback = log.counters()
    finally:
        log.close()
    if store == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(str(where) + suffix).unlink(missing_ok=True)
    path.unlink()
    joined = summary.outcomes["joined"]
    if joined != n or feedback["joined"] != n or counters.get("g1", {}).get("labelled_requests") != n:
        raise AssertionError(f"{store}/{fmt}: {joined} of {n} requests joined (outcomes {summary.outcomes}, "
                             f"feedback counters {feedback}): the import is broken, not slow")
    total = t1 - t0
    return {"requests": n, "record_s": round(record_s, 3), "records_per_s": round(n / record_s, 1),
            "file_mb": round(file_mb, 2), "read_s": round(t_read - t0, 3), "join_s": round(summary.seconds, 3),
            "total_s": round(total, 3), "labels_per_s": round(joined / total, 1),
            "join_only_labels_per_s": round(joined / summary.seconds, 1), "joined": joined,
            "labelled_samples": summary.labelled_samples, "outcomes": summary.outcomes}


def _median_row(runs: list[dict]) -> dict:
    keys = ("records_per_s", "read_s", "join_s", "total_s", "labels_per_s", "join_only_labels_per_s")
    return {"median": {k: round(statistics.median(r[k] for r in runs), 3 if k.endswith("_s") else 1)
                       for k in keys},
            "joined": runs[0]["joined"], "file_mb": runs[0]["file_mb"], "runs": runs}


def run_imports(args) -> dict:
    fmts = [f for f in args.formats if f != "parquet" or _have_pyarrow()]
    out: dict[str, Any] = {}
    if "parquet" in args.formats and "parquet" not in fmts:
        out["parquet_skipped"] = "pyarrow is not installed"
    for store in args.stores:
        server = None
        if store == "redis":
            binary = shutil.which("redis-server")
            if binary is None:
                out["redis"] = {"skipped": "redis-server is not installed (apt-get install redis-server; "
                                           "scripts/install-system.sh)"}
                print(f"redis: {out['redis']['skipped']}", file=sys.stderr)
                continue
            server = RedisServer(binary=binary).start()
        try:
            res: dict[str, Any] = {}
            if server is not None:
                import redis

                with redis.Redis.from_url(server.url) as r:
                    res["server"] = f"redis-server {r.info('server')['redis_version']}"
            with tempfile.TemporaryDirectory(prefix="graceful-bench-predlog-") as tmp:
                for fmt in fmts:
                    runs = []
                    for rep in range(args.repeats):
                        r = _import_once(store, fmt, args.import_requests, rep, Path(tmp), server)
                        runs.append(r)
                        print(f"{store}/{fmt} run {rep + 1}/{args.repeats}: logged {r['records_per_s']:,.0f}/s, "
                              f"imported {r['labels_per_s']:,.0f} labels/s (read {r['read_s']:.2f} s, join "
                              f"{r['join_s']:.2f} s)", file=sys.stderr, flush=True)
                    res[fmt] = _median_row(runs)
            out[store] = res
        finally:
            if server is not None:
                server.close()
    return out


# --- (2) the flood, in a child process -------------------------------------------------------

def flood_child(store: str, n: int, cap_mb: float, sample_every: int) -> dict:
    """Runs in a fresh process: `n` requests into a capped log of `store`, RSS sampled."""
    import gc

    if store == "memory":
        from serving.predlog.memory import MemoryLog

        log = MemoryLog(RETENTION_S, int(cap_mb * 2**20))
        tmp = None
    else:
        from serving.predlog.sqlite import SqliteLog

        tmp = tempfile.mkdtemp(prefix="graceful-bench-flood-")
        log = SqliteLog(Path(tmp) / "predictions.sqlite", RETENTION_S, int(cap_mb * 2**20))
    rng = np.random.default_rng(0)
    pool = rng.integers(0, CLASSES, (1024, 2, ROWS), dtype=np.int32)  # predictions cycled through
    flush_every = max(1, getattr(log, "max_pending", 0) // 2) if store != "memory" else 0
    gc.collect()
    start = rss_mb()
    samples = [{"requests": 0, "rss_mb": round(start, 1), "cap_reached": False}]
    cap_at: Optional[dict] = None
    half = start
    t0 = time.perf_counter()
    for i in range(n):
        p = pool[i & 1023]
        log.record(uuid.uuid4().hex, "g0", {"g0": (GENS["g0"], p[0]), "g1": (GENS["g1"], p[1])})
        k = i + 1
        if flush_every and k % flush_every == 0 and not log.flush(timeout_s=300):
            raise RuntimeError("sqlite flood: flush timed out")
        if cap_at is None and k % 1000 == 0 and log.pruned["bytes"] > 0:
            cap_at = {"requests": k, "rss_mb": round(rss_mb(), 1), "cap_reached": True, "first_prune": True}
            samples.append(cap_at)
        if k % sample_every == 0 or k == n:
            if k == n:
                log.flush(timeout_s=300)
            if samples[-1]["requests"] == k:  # the first prune's sample, taken just now
                samples[-1].pop("first_prune", None)
            else:
                samples.append({"requests": k, "rss_mb": round(rss_mb(), 1), "cap_reached": log.pruned["bytes"] > 0})
        if k == n // 2:
            half = rss_mb()
    seconds = time.perf_counter() - t0
    end = rss_mb()
    desc = log.describe()
    log.close()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    capped = [s for s in samples if s["cap_reached"]]
    return {"store": store, "requests": n, "cap_mb": cap_mb, "seconds": round(seconds, 2),
            "records_per_s": round(n / seconds, 1), "rss_mb_start": round(start, 1), "rss_mb_after": round(end, 1),
            "rss_mb_max": max(s["rss_mb"] for s in samples),
            "rss_mb_at_cap": capped[0]["rss_mb"] if capped else None,
            "requests_at_cap": capped[0]["requests"] if capped else None,
            "rss_growth_after_cap_mb": round(end - capped[0]["rss_mb"], 1) if capped else None,
            "rss_growth_second_half_mb": round(end - half, 1),
            "samples": samples, "describe": desc}


def run_flood(store: str, args, cap_mb: float, timeout_s: Optional[float]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--flood-child", store, "--flood", str(args.flood),
           "--sample-every", str(args.sample_every), "--child-cap-mb", str(cap_mb)]
    print(f"flood: {args.flood:,} requests into a {store} log capped at {cap_mb} MB (fresh process)",
          file=sys.stderr, flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not finish in {timeout_s:.0f} s"}
    if p.returncode != 0:
        raise RuntimeError(f"flood child ({store}) failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- output ------------------------------------------------------------------------------------

def render(res: dict) -> str:
    meta = res["meta"]
    lines = [f"label import, {meta['import_requests']:,} requests of {ROWS} rows (production + 1 candidate) per "
             f"store and file, median of {meta['repeats']}:", "",
             "| store | label file | logged records/s | file read s | join s | labels/s (read + join) | "
             "labels/s (join only) | joined | target >= 20,000/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    imp = res["import"]
    for store in meta["stores"]:
        r = imp.get(store, {})
        if "skipped" in r:
            lines.append(f"| {store} | - | - | - | - | skipped: {r['skipped']} | - | - | - |")
            continue
        for fmt in meta["formats"]:
            if fmt not in r:
                lines.append(f"| {store} | {fmt} | - | - | - | skipped: {imp.get(fmt + '_skipped', '?')} | - | - | - |")
                continue
            m = r[fmt]["median"]
            ok = "met" if m["labels_per_s"] >= TARGET_LABELS_PER_S else "MISSED"
            lines.append(f"| {store} | {fmt} | {m['records_per_s']:,.0f} | {m['read_s']:.2f} | {m['join_s']:.2f} | "
                         f"{m['labels_per_s']:,.0f} | {m['join_only_labels_per_s']:,.0f} | "
                         f"{r[fmt]['joined']:,} | {ok} |")
    lines += ["", f"import_labels_per_s ({res['import_labels_per_s_of']}): {res['import_labels_per_s']:,.0f} labels/s, "
                  f"target >= {TARGET_LABELS_PER_S:,}/s: {'met' if res['target_met'] else 'MISSED'}", ""]
    lines += ["memory flood, each in a fresh process:", "",
              "| log | cap MB | requests | records/s | RSS MB start | RSS MB at cap (requests) | RSS MB after | "
              "growth after cap MB | growth, 2nd half MB | kept | store bytes | pruned by bytes | dropped |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for store, f in res["flood"].items():
        if "skipped" in f:
            lines.append(f"| {store} | - | - | - | - | skipped: {f['skipped']} | - | - | - | - | - | - | - |")
            continue
        d = f["describe"]
        at_cap = "cap not reached" if f["rss_mb_at_cap"] is None else f"{f['rss_mb_at_cap']} ({f['requests_at_cap']:,})"
        growth = "-" if f["rss_growth_after_cap_mb"] is None else f"{f['rss_growth_after_cap_mb']:+.1f}"
        lines.append(f"| {store} | {f['cap_mb']:g} | {f['requests']:,} | {f['records_per_s']:,.0f} | "
                     f"{f['rss_mb_start']} | {at_cap} | {f['rss_mb_after']} | {growth} | {f['rss_growth_second_half_mb']:+.1f} | "
                     f"{d['requests']:,} | "
                     f"{d['bytes'] / 2**20:.1f} MB | {d['pruned']['bytes']:,} | {d['dropped']} |")
    mem = res["flood"]["memory"]
    lines += ["", "RSS of the memory log's process, every " + f"{meta['sample_every']:,} requests (MB): " +
              ", ".join(f"{s['rss_mb']}" for s in mem["samples"] if not s.get("first_prune"))]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--import-requests", type=int, default=None,
                    help="requests logged, then labelled, per store, file format and repeat (100,000; --quick 2,000)")
    ap.add_argument("--repeats", type=int, default=None, help="fresh stores per (store, format); medians shown (3; --quick 1)")
    ap.add_argument("--stores", nargs="+", choices=("sqlite", "redis"), default=["sqlite", "redis"],
                    help="durable stores of the import part")
    ap.add_argument("--formats", nargs="+", choices=("jsonl", "parquet", "csv"), default=["jsonl", "parquet"],
                    help="label file formats (parquet needs pyarrow)")
    ap.add_argument("--flood", type=int, default=None, help="requests logged in the flood (1,000,000; --quick 20,000)")
    ap.add_argument("--sample-every", type=int, default=None, help="requests between RSS samples (100,000; --quick 5,000)")
    ap.add_argument("--memory-cap-mb", type=float, default=None,
                    help="the memory log's byte cap, serving.prediction_log_max_bytes (64; --quick 4)")
    ap.add_argument("--sqlite-cap-mb", type=float, default=None, help="the sqlite log's byte cap in the flood (64; --quick 4)")
    ap.add_argument("--no-sqlite-flood", action="store_true", help="flood the memory log only")
    ap.add_argument("--sqlite-flood-timeout-s", type=float, default=180.0,
                    help="the sqlite flood is given up (and reported so) after this long")
    ap.add_argument("--quick", action="store_true", help="a smoke run with small numbers, written to " + str(QUICK_OUT))
    ap.add_argument("--out", default=None, help=f"the JSON written ({OUT.relative_to(ROOT)}; --quick {QUICK_OUT})")
    ap.add_argument("--flood-child", choices=("memory", "sqlite"), help=argparse.SUPPRESS)
    ap.add_argument("--child-cap-mb", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    for name, full, quick in (("import_requests", 100_000, 2_000), ("repeats", 3, 1), ("flood", 1_000_000, 20_000),
                              ("sample_every", 100_000, 5_000), ("memory_cap_mb", 64.0, 4.0),
                              ("sqlite_cap_mb", 64.0, 4.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)

    if args.flood_child:
        print(json.dumps(flood_child(args.flood_child, args.flood, args.child_cap_mb, args.sample_every)))
        return 0

    out = Path(args.out) if args.out else (QUICK_OUT if q else OUT)
    t_start = time.perf_counter()
    imports = run_imports(args)
    flood = {"memory": run_flood("memory", args, args.memory_cap_mb, None)}
    if not args.no_sqlite_flood:
        flood["sqlite"] = run_flood("sqlite", args, args.sqlite_cap_mb, args.sqlite_flood_timeout_s)
    mem = flood["memory"]
    top = imports["sqlite"]["jsonl"]["median"]["labels_per_s"] if "jsonl" in imports.get("sqlite", {}) else None
    res = {
        "import_labels_per_s": top,
        "import_labels_per_s_of": "sqlite/jsonl",
        "target_labels_per_s": TARGET_LABELS_PER_S,
        "target_met": top is not None and top >= TARGET_LABELS_PER_S,
        "rss_mb_start": mem["rss_mb_start"],
        "rss_mb_after": mem["rss_mb_after"],
        "rss_mb_after_of": f"memory log, after {mem['requests']:,} logged requests (cap {mem['cap_mb']:g} MB)",
        "rss_growth_after_cap_mb": mem["rss_growth_after_cap_mb"],
        "rss_growth_second_half_mb": mem["rss_growth_second_half_mb"],
        "import": imports,
        "flood": flood,
        "meta": {"import_requests": args.import_requests, "repeats": args.repeats, "stores": args.stores,
                 "formats": args.formats, "rows_per_request": ROWS, "generations": "production g0 + candidate g1",
                 "import_batch_size": IMPORT_BATCH, "flood": args.flood, "sample_every": args.sample_every,
                 "quick": q, "python": sys.version.split()[0], "cpus": os.cpu_count(),
                 "seconds": round(time.perf_counter() - t_start, 1)},
    }
    if top is None:
        raise SystemExit("no sqlite/jsonl figure: run with the sqlite store and the jsonl format")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(render(res))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
