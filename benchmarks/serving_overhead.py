"""What the router costs: the same HTTP load against nine set-ups, side by side, in one run.

(a) plain: the model as one Ray Serve deployment over HTTP (batched like ours);
(b) composition: an ingress forwarding to the model through a deployment handle, nothing
    else (Ray Serve's model-composition pattern);
(c) router: our router, every feature on (split, prediction log, counters, Ray metrics,
    latency windows), no shadow, the `memory` prediction log;
(d) router_shadow: the same with one shadow generation;
(e) router_local: our router with the model inside the router replica
    (serving.in_router_models: no handle hop), to compare with (a); memory log;
(f) router_local_shadow: the same with the shadow inside the router replica too;
(g) router_sqlite: (c) with the `sqlite` log (the default: a WAL file, each answer
    waits for its row's group commit, serving.prediction_log_sync);
(h) router_redis: (c) with the `redis` log on a local redis-server (no persistence);
(i) router_2replicas: (g) with two router replicas sharing the file.
Saturated (concurrency 8) and idle (concurrency 1); batch of 4 rows per request. The
set-ups run in interleaved rounds so that drift on the shared machine hits all alike.
The routers of (c), (g), (h), (i) call the same model replica through its handle.

Then (faulty_shadow) what a broken shadow costs the primary: a router set up as in
tests/integration/test_serving.py (shadow timeout 0.3 s, at most 8 shadows in flight), idle
load, blocks with no shadow interleaved with blocks mirrored to a candidate that raises on
every request ("error") or answers after 0.6 s ("timeout"); primary p50 with it / without.

    flock /tmp/graceful-cpu.lock python benchmarks/serving_overhead.py
    flock /tmp/graceful-cpu.lock python benchmarks/serving_overhead.py --only faulty_shadow   # that part alone

Writes benchmarks/results/serving_overhead.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETUPS = ("plain", "composition", "router", "router_shadow", "router_local", "router_local_shadow",
          "router_sqlite", "router_redis", "router_2replicas")
# Set-ups served by one router with its shadow off or on: (router, shadowed set-up).
TOGGLED = {"router": "main", "router_shadow": "main", "router_local": "local", "router_local_shadow": "local"}
SHADOWED = {"router_shadow", "router_local_shadow"}
MODES = {"saturated": 8, "idle": 1}
FAULTS = {"error": {"error": True}, "timeout": {"delay_s": 0.6}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_models(tmp: Path):
    from serving.refs import ModelRef
    from workers.checkpoint import save_model
    from workers.data import load_dataset
    from workers.models import build_model
    from workers.specs import ArchSpec, DataSpec, TrainSpec
    from workers.training import fit

    ds = load_dataset(DataSpec(source="digits"))
    refs = []
    for name, seed in (("g0", 0), ("g1", 1)):
        model = build_model(ArchSpec(type="mlp", width=64, depth=2, embed_dim=32), ds.input_dim, ds.num_classes)
        fit(model, ds.train, TrainSpec(steps=100, batch_size=64, seed=seed))
        refs.append(ModelRef(name, str(tmp / name / "model.pt"), save_model(model, tmp / name)))
    return ds, refs


def _baselines(ref, spec):
    """Deploy (a) and (b); return their URL paths."""
    from ray import serve
    from starlette.requests import Request

    from serving.deploy import ModelServer, deploy_generation

    class Plain(ModelServer):
        async def __call__(self, request: Request) -> dict:
            x = np.asarray((await request.json())["inputs"], dtype=np.float32)
            probs = await self.predict(x)
            return {"predictions": probs.argmax(1).tolist(), "probabilities": probs.tolist()}

    class Composition:
        def __init__(self, app_name: str):
            self.handle = serve.get_app_handle(app_name)

        async def __call__(self, request: Request) -> dict:
            x = np.asarray((await request.json())["inputs"], dtype=np.float32)
            probs = await self.handle.predict.remote(x)
            return {"predictions": probs.argmax(1).tolist(), "probabilities": probs.tolist()}

    opts = dict(num_replicas=1, max_ongoing_requests=spec.max_ongoing_requests,
                ray_actor_options={"num_cpus": spec.cpus_per_replica})
    serve.run(serve.deployment(Plain).options(name="plain", **opts).bind(
        ref, spec.max_batch_size, spec.batch_wait_timeout_s), name="bench-plain", route_prefix="/plain")
    # (b) gets its own copy of the model so that it shares no replica with the router.
    from serving.refs import ModelRef

    own = ModelRef("bench-comp-model", ref.uri, ref.sha256)
    deploy_generation(own, spec)
    serve.run(serve.deployment(Composition).options(
        name="composition", num_replicas=1, max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": spec.router_cpus}).bind(own.app_name),
        name="bench-composition", route_prefix="/composition")
    return {"plain": "/plain", "composition": "/composition"}


def _load(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[float], int]:
    """Send every body once, `concurrency` at a time; (seconds, latencies ms, failures)."""
    lock = threading.Lock()
    nxt = [0]
    lat: list[float] = []
    failed = [0]

    def worker():
        with requests.Session() as s:
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= len(bodies):
                    return
                t0 = time.perf_counter()
                r = s.post(url, data=bodies[i], headers={"Content-Type": "application/json"}, timeout=30)
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    if r.status_code == 200:
                        lat.append(ms)
                    else:
                        failed[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, lat, failed[0]


def _faulty_shadow(ds, g0, g1, token: str, blocks: int, per_block: int) -> dict:
    """Primary latency, no shadow vs a faulty one (FAULTS), idle, `blocks` interleaved pairs
    of `per_block` requests each; its own router, stopped at the end."""
    from serving import deploy
    from serving.client import RouterClient
    from serving.refs import ModelRef
    from serving.specs import ServingSpec

    spec = ServingSpec(port=_free_port(), router_cpus=0.25, shadow_timeout_s=0.3, shadow_max_inflight=8,
                       prediction_log="memory")
    base = deploy.start_serving(spec, g0, [], shadows=[], admin_token=token)
    url = base + "/v1/predict"
    client = RouterClient(base, token)
    rng = np.random.default_rng(1)
    bodies = [json.dumps({"inputs": ds.test.x[rng.integers(0, len(ds.test), 4)].tolist(),
                          "user_id": f"f{i}"}).encode() for i in range(blocks * per_block)]
    out: dict = {}
    try:
        for label, fault in FAULTS.items():
            bad = ModelRef(f"bad-{label}", g1.uri, g1.sha256)
            deploy.add_generation(bad, spec, shadow=True, inject_fault=fault)
            arms = {arm: {"lat": [], "failed": 0} for arm in ("none", "shadow")}
            for arm in arms:  # warm-up
                client.set_traffic({"g0": 1.0}, shadows=[bad.name] if arm == "shadow" else [])
                _load(url, bodies[:30], 1)
            for b in range(blocks):
                chunk = bodies[b * per_block:(b + 1) * per_block]
                for arm in (("none", "shadow") if b % 2 == 0 else ("shadow", "none")):
                    client.set_traffic({"g0": 1.0}, shadows=[bad.name] if arm == "shadow" else [])
                    _, lat, failed = _load(url, chunk, 1)
                    arms[arm]["lat"] += lat
                    arms[arm]["failed"] += failed
            client.set_traffic({"g0": 1.0}, shadows=[])
            time.sleep(1.0)  # the last mirrored copies time out or fail, then are counted
            counters = client.status()["generations"][bad.name]["counters"]
            deploy.remove_generation(bad.name)
            row = {arm: {"p50_ms": round(float(np.percentile(a["lat"], 50)), 2),
                         "p99_ms": round(float(np.percentile(a["lat"], 99)), 2),
                         "n": len(a["lat"]), "failed": a["failed"]} for arm, a in arms.items()}
            row["p50_ratio"] = round(row["shadow"]["p50_ms"] / row["none"]["p50_ms"], 3)
            row["p99_ratio"] = round(row["shadow"]["p99_ms"] / row["none"]["p99_ms"], 3)
            row["fault"] = fault
            row["shadow_counters"] = {k: counters[k] for k in ("requests_shadow", "shadow_errors", "shadow_timeouts",
                                                               "shadow_dropped", "compared")}
            out[label] = row
    finally:
        client.close()
        deploy.stop_serving()
    out["meta"] = {"requests_per_arm": blocks * per_block, "blocks": blocks, "concurrency": 1,
                   "rows_per_request": 4, "shadow_timeout_s": spec.shadow_timeout_s,
                   "shadow_max_inflight": spec.shadow_max_inflight}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1500, help="requests per set-up and mode")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds the requests are split into")
    ap.add_argument("--faulty-blocks", type=int, default=10, help="interleaved block pairs, faulty_shadow")
    ap.add_argument("--faulty-per-block", type=int, default=30, help="requests per block, faulty_shadow")
    ap.add_argument("--only", choices=("setups", "faulty_shadow"),
                    help="run one part; the other's results already in --out are kept")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serving_overhead.json"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    results: dict = {}
    if args.only and out.exists():
        results = json.loads(out.read_text())

    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    token = "bench-admin-token"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ds, (g0, g1) = _train_models(Path(tmp))
            if args.only != "faulty_shadow":
                _setups(args, results, ds, g0, g1, token, Path(tmp))
                serve.shutdown()
            if args.only != "setups":
                results["faulty_shadow"] = _faulty_shadow(ds, g0, g1, token, args.faulty_blocks,
                                                          args.faulty_per_block)
    finally:
        serve.shutdown()
        ray.shutdown()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    return 0


def _log_routers(spec, g0, token: str, tmp: Path, redis_url: str) -> dict[str, str]:
    """The routers of (g), (h), (i): no candidate, each its own app and route prefix."""
    from ray import serve

    from serving.deploy import router_application

    routes = {}
    for setup, update in (("router_sqlite", {"prediction_log": "sqlite",
                                             "prediction_log_path": str(tmp / "bench-sqlite.sqlite")}),
                          ("router_redis", {"prediction_log": "redis", "redis_url": redis_url}),
                          ("router_2replicas", {"prediction_log": "sqlite", "router_replicas": 2,
                                                "prediction_log_path": str(tmp / "bench-2replicas.sqlite")})):
        prefix = "/" + setup
        serve.run(router_application(spec.model_copy(update=update), g0, [], shadows=[], admin_token=token),
                  name=f"bench-{setup}", route_prefix=prefix)
        routes[setup] = prefix + "/v1/predict"
    return routes


def _setups(args, results: dict, ds, g0, g1, token: str, tmp: Path) -> None:
    """The set-ups (module docstring), saturated and idle, into `results`."""
    from serving import deploy
    from serving.client import RouterClient
    from serving.specs import ServingSpec
    from tests.redis_server import RedisServer

    # Eleven replicas must fit Ray's 2 logical CPUs, or Serve waits for resources forever.
    spec = ServingSpec(port=_free_port(), router_cpus=0.1, prediction_log="memory")
    redis_server = RedisServer(binary="redis-server").start()  # FileNotFoundError when not installed
    try:
        base = deploy.start_serving(spec, g0, [g1], shadows=[], admin_token=token)
        paths = _baselines(g0, spec)
        local = deploy.start_serving(spec.model_copy(update={"in_router_models": True}), g0, [g1], shadows=[],
                                     admin_token=token, app_name="bench-local", route_prefix="/local")
        routes = _log_routers(spec, g0, token, tmp, redis_server.url)
        clients = {"main": RouterClient(base, token), "local": RouterClient(local, token)}
        urls = {"plain": base + paths["plain"], "composition": base + paths["composition"],
                "router": base + "/v1/predict", "router_shadow": base + "/v1/predict",
                "router_local": local + "/v1/predict", "router_local_shadow": local + "/v1/predict",
                **{k: base + v for k, v in routes.items()}}
        _measure(args, results, ds, urls, clients)
        shadow = clients["main"].status()["generations"]["g1"]["counters"]
        results["meta"] = {
            "requests_per_setup": (args.requests // args.rounds) * args.rounds, "rows_per_request": 4,
            "concurrency": MODES, "rounds": args.rounds, "model": "mlp width 64 depth 2, digits (64 inputs)",
            "logs": {s: ("sqlite" if s in ("router_sqlite", "router_2replicas") else "redis (no persistence)"
                         if s == "router_redis" else "memory") for s in SETUPS if s.startswith("router")},
            "shadow_counters": {k: shadow[k] for k in ("requests_shadow", "shadow_errors",
                                                       "shadow_timeouts", "shadow_dropped", "compared")},
        }
        for c in clients.values():
            c.close()
    finally:
        redis_server.close()


def _toggle(clients: dict, setup: str) -> None:
    if setup in TOGGLED:
        clients[TOGGLED[setup]].set_traffic({"g0": 1.0}, shadows=["g1"] if setup in SHADOWED else [])


def _measure(args, results: dict, ds, urls: dict, clients: dict) -> None:
    rng = np.random.default_rng(0)
    bodies = [json.dumps({"inputs": ds.test.x[rng.integers(0, len(ds.test), 4)].tolist(),
                          "user_id": f"u{i}"}).encode() for i in range(args.requests)]
    per_round = args.requests // args.rounds
    for mode, conc in MODES.items():
        acc = {s: {"seconds": 0.0, "lat": [], "failed": 0, "n": 0} for s in SETUPS}
        for setup in SETUPS:  # warm-up
            _toggle(clients, setup)
            _load(urls[setup], bodies[:50], conc)
        for rnd in range(args.rounds):
            order = SETUPS[rnd % len(SETUPS):] + SETUPS[:rnd % len(SETUPS)]
            for setup in order:
                _toggle(clients, setup)
                chunk = bodies[rnd * per_round:(rnd + 1) * per_round]
                secs, lat, failed = _load(urls[setup], chunk, conc)
                a = acc[setup]
                a["seconds"] += secs
                a["lat"] += lat
                a["failed"] += failed
                a["n"] += len(chunk)
            print(f"{mode}: round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        results[mode] = {s: {"rps": round(a["n"] / a["seconds"], 1),
                             "p50_ms": round(float(np.percentile(a["lat"], 50)), 2),
                             "p99_ms": round(float(np.percentile(a["lat"], 99)), 2),
                             "failed": a["failed"]} for s, a in acc.items()}


def render(results: dict) -> str:
    """Markdown tables of the results there are, with the targets' ratios."""
    lines = _render_setups(results) if "saturated" in results else []
    if "faulty_shadow" in results:
        lines += ["", *_render_faulty(results["faulty_shadow"])]
    return "\n".join(lines).strip("\n")


def _render_faulty(res: dict) -> list[str]:
    meta = res["meta"]
    lines = [f"faulty shadow vs none, idle, {meta['requests_per_arm']} requests each, shadow timeout "
             f"{meta['shadow_timeout_s']} s, {meta['shadow_max_inflight']} in flight:", "",
             "| shadow | primary p50 ms, none | primary p50 ms, faulty shadow | p50 ratio | p99 ms, none | "
             "p99 ms, faulty shadow | failed | shadow errors / timeouts / dropped |",
             "|---|---|---|---|---|---|---|---|"]
    for label in FAULTS:
        r = res[label]
        c = r["shadow_counters"]
        lines.append(f"| {label} | {r['none']['p50_ms']} | {r['shadow']['p50_ms']} | {r['p50_ratio']:.2f}x | "
                     f"{r['none']['p99_ms']} | {r['shadow']['p99_ms']} | {r['none']['failed'] + r['shadow']['failed']} | "
                     f"{c['shadow_errors']} / {c['shadow_timeouts']} / {c['shadow_dropped']} |")
    lines += ["", "faulty shadow vs none: primary p50 ratio " +
              ", ".join(f"{label} {res[label]['p50_ratio']:.2f}x" for label in FAULTS) + " (target <= 1.2)"]
    return lines


def _render_setups(results: dict) -> list[str]:
    lines = ["| set-up | saturated rps | saturated p50 ms | saturated p99 ms | idle rps | idle p50 ms | idle p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for s in (s for s in SETUPS if s in results["saturated"]):
        sat, idle = results["saturated"][s], results["idle"][s]
        lines.append(f"| {s} | {sat['rps']} | {sat['p50_ms']} | {sat['p99_ms']} | "
                     f"{idle['rps']} | {idle['p50_ms']} | {idle['p99_ms']} |")
    sat, idle = results["saturated"], results["idle"]

    def ratio(a: str, b: str, target: float, what: str = "p50_ms") -> str:
        """a / b of `what` in both modes, judged against `target` in each."""
        parts = []
        for mode, r in (("saturated", sat), ("idle", idle)):
            x = r[a][what] / r[b][what]
            parts.append(f"{mode} {x:.2f}x ({'met' if x <= target else 'MISSED'})")
        return f"{a} / {b}, p50: " + ", ".join(parts) + f" (target <= {target})"

    lines += ["", f"router / composition, saturated: throughput {sat['router']['rps'] / sat['composition']['rps']:.2f}x "
                  f"(target >= 0.85), p50 {sat['router']['p50_ms'] / sat['composition']['p50_ms']:.2f}x (target <= 1.15)",
              f"router / composition, idle: throughput {idle['router']['rps'] / idle['composition']['rps']:.2f}x, "
              f"p50 {idle['router']['p50_ms'] / idle['composition']['p50_ms']:.2f}x",
              f"router_shadow / router, idle p50: {idle['router_shadow']['p50_ms'] / idle['router']['p50_ms']:.2f}x "
              f"(target <= 1.2); saturated rps {sat['router_shadow']['rps'] / sat['router']['rps']:.2f}x",
              f"router_local / plain, saturated: throughput {sat['router_local']['rps'] / sat['plain']['rps']:.2f}x, "
              f"p50 {sat['router_local']['p50_ms'] / sat['plain']['p50_ms']:.2f}x; idle p50 "
              f"{idle['router_local']['p50_ms'] / idle['plain']['p50_ms']:.2f}x"]
    if "router_sqlite" in sat:  # results from before the prediction log set-ups lack them
        x = sat["router_local_shadow"]["p50_ms"] / sat["plain"]["p50_ms"]
        lines += [f"router_local_shadow / plain, saturated p50: {x:.2f}x ({'met' if x <= 1.2 else 'MISSED'}) "
                  f"(target <= 1.2); throughput {sat['router_local_shadow']['rps'] / sat['plain']['rps']:.2f}x",
                  ratio("router_sqlite", "router", 1.1), ratio("router_redis", "router", 1.2),
                  f"router_2replicas / router_sqlite, saturated: throughput "
                  f"{sat['router_2replicas']['rps'] / sat['router_sqlite']['rps']:.2f}x, p50 "
                  f"{sat['router_2replicas']['p50_ms'] / sat['router_sqlite']['p50_ms']:.2f}x"]
    return lines


if __name__ == "__main__":
    sys.exit(main())
