"""The registry's two backends side by side: what a write, a compare-and-set transition and
a pipeline pass's reads cost on the embedded SQLite file and on PostgreSQL.

Both durable as in production: SQLite in WAL mode with synchronous=FULL (the registry's
settings), PostgreSQL with fsync on (a server started here on 127.0.0.1, data in a
temporary directory on the same disk). One process each, then two processes writing at
once (the controller and a CLI, or two pods):

  audit        `Registry.audit`, one event per transaction
  transition   `Registry.transition`, compare-and-set, the rollout's step moved by one
  pass_reads   the reads one `graceful run` pass makes per generation (its record, its
               evaluations, its latest recorded stage and failures), for 20 generations
  two_writers  two processes, `--writes` audits each, at once: events/s over both

Rows {"backend", "op", "n", "per_s", "p50_ms", "p99_ms"} go to
benchmarks/results/registry_backends.json, and a table to stdout:

    python -m benchmarks.registry_backends                 # about a minute
    python -m benchmarks.registry_backends --writes 2000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, write_json  # noqa: E402
from orchestrator.registry import Registry  # noqa: E402
from tests.postgres_server import PostgresServer, bin_dirs  # noqa: E402  (the tests' real server starter)

PASSWORD_ENV = "GRACEFUL_REGISTRY_PASSWORD"
GENERATIONS = 20


def _timed(fn, n: int) -> list[float]:
    out = []
    for k in range(n):
        t0 = time.perf_counter()
        fn(k)
        out.append(time.perf_counter() - t0)
    return out


def _row(backend: str, op: str, seconds: list[float], per: int = 1) -> dict:
    s = np.asarray(seconds)
    return {"backend": backend, "op": op, "n": len(s) * per, "per_s": round(len(s) * per / s.sum(), 1),
            "p50_ms": round(1000 * float(np.percentile(s, 50)), 3), "p99_ms": round(1000 * float(np.percentile(s, 99)), 3)}


def _writer(location: str, who: str, n: int, barrier, out) -> None:
    reg = Registry(location, password_env=PASSWORD_ENV)
    barrier.wait(timeout=60)
    t0 = time.perf_counter()
    for k in range(n):
        reg.audit(who, "bench", "two", str(k))
    out.put((who, time.perf_counter() - t0))
    reg.close()


def measure(backend: str, location: str, writes: int) -> list[dict]:
    rows = []
    reg = Registry(location, password_env=PASSWORD_ENV)
    try:
        rows.append(_row(backend, "audit", _timed(lambda k: reg.audit("bench", "note", "s", str(k)), writes)))
        parent = None
        for g in range(GENERATIONS):
            name = f"g{g}"
            reg.add_generation(name, parent, "mlp", "h", f"/x/{name}", format(g, "064x"))
            reg.record_evaluation(name, parent, {"nfr": 0.01}, True, [])
            reg.audit("pipeline", "pipeline_stage", name, "new -> evaluate", None, "evaluate")
            parent = name
        reg.bootstrap_production("g0", "bench")
        rid = reg.start_rollout("g1", "g0", "ctl", "bench").id
        reg.transition(rid, ("shadow", 0), state="canary", step=1, weight=0.1, actor="ctl", action="advance",
                       reason="")
        state = {"step": 1}

        def move(_k: int) -> None:
            reg.transition(rid, ("canary", state["step"]), state="canary", step=state["step"] + 1, weight=0.1,
                           actor="ctl", action="advance", reason="bench")
            state["step"] += 1

        rows.append(_row(backend, "transition", _timed(move, max(50, writes // 4))))

        def pass_reads(_k: int) -> None:
            reg.production(), reg.active_rollout()
            for g in range(GENERATIONS):
                reg.generation(f"g{g}"), reg.evaluations(f"g{g}")
                reg.events(f"g{g}", limit=1, actions=("pipeline_stage",))
                reg.events(f"g{g}", actions=("pipeline_failed",))

        rows.append(_row(backend, "pass_reads", _timed(pass_reads, 30)))
    finally:
        reg.close()
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(location, w, writes, barrier, out)) for w in "ab"]
    for p in procs:
        p.start()
    took = dict(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(60)
    wall = max(took.values())
    rows.append({"backend": backend, "op": "two_writers", "n": 2 * writes, "per_s": round(2 * writes / wall, 1),
                 "p50_ms": None, "p99_ms": None})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writes", type=int, default=1000, help="audits per process (default 1000)")
    args = ap.parse_args(argv)
    dirs = bin_dirs()
    if not dirs:
        print("PostgreSQL is not installed (apt-get install postgresql)", file=sys.stderr)
        return 2
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="graceful-regbench-") as tmp:
        rows += measure("sqlite", str(Path(tmp) / "registry.sqlite"), args.writes)
        server = PostgresServer(bin_dir=dirs[0], durable=True).start()
        try:
            os.environ[PASSWORD_ENV] = server.password
            rows += measure("postgresql", server.create_database(), args.writes)
        finally:
            server.close()
    print(f"{'backend':<11} {'op':<12} {'n':>6} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.2f}"
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.2f}"
        print(f"{r['backend']:<11} {r['op']:<12} {r['n']:>6} {r['per_s']:>9.1f} {p50:>8} {p99:>8}")
    write_json(RESULTS / "registry_backends.json",
               {"rows": rows, "meta": {"writes": args.writes, "generations": GENERATIONS, "cpus": os.cpu_count(),
                                       "sqlite": "WAL, synchronous=FULL", "postgresql": "15, fsync on, 127.0.0.1"}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
