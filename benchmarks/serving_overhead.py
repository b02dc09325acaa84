"""What the router costs: the same HTTP load against four set-ups, side by side, in one run.

(a) plain: the model as one Ray Serve deployment over HTTP (batched like ours);
(b) composition: an ingress forwarding to the model through a deployment handle, nothing
    else (Ray Serve's model-composition pattern);
(c) router: our router, every feature on (split, feedback store, counters, Ray metrics,
    latency windows), no shadow;
(d) router_shadow: the same with one shadow generation;
(e) router_local: our router with the model inside the router replica
    (serving.in_router_models: no handle hop), to compare with (a).
Saturated (concurrency 8) and idle (concurrency 1); batch of 4 rows per request. The
set-ups run in interleaved rounds so that drift on the shared machine hits all alike.

    flock /tmp/graceful-cpu.lock python benchmarks/serving_overhead.py

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

SETUPS = ("plain", "composition", "router", "router_shadow", "router_local")
MODES = {"saturated": 8, "idle": 1}


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1500, help="requests per set-up and mode")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds the requests are split into")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serving_overhead.json"))
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from serving import deploy
    from serving.client import RouterClient
    from serving.specs import ServingSpec

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    token = "bench-admin-token"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ds, (g0, g1) = _train_models(Path(tmp))
            # Seven replicas must fit Ray's 2 logical CPUs, or Serve waits for resources forever.
            spec = ServingSpec(port=_free_port(), router_cpus=0.25)
            base = deploy.start_serving(spec, g0, [g1], shadows=[], admin_token=token)
            paths = _baselines(g0, spec)
            local = deploy.start_serving(spec.model_copy(update={"in_router_models": True}), g0, shadows=[],
                                         admin_token=token, app_name="bench-local", route_prefix="/local")
            client = RouterClient(base, token)
            urls = {"plain": base + paths["plain"], "composition": base + paths["composition"],
                    "router": base + "/v1/predict", "router_shadow": base + "/v1/predict",
                    "router_local": local + "/v1/predict"}
            rng = np.random.default_rng(0)
            bodies = [json.dumps({"inputs": ds.test.x[rng.integers(0, len(ds.test), 4)].tolist(),
                                  "user_id": f"u{i}"}).encode() for i in range(args.requests)]
            per_round = args.requests // args.rounds
            results: dict = {}
            for mode, conc in MODES.items():
                acc = {s: {"seconds": 0.0, "lat": [], "failed": 0, "n": 0} for s in SETUPS}
                for setup in SETUPS:  # warm-up
                    client.set_traffic({"g0": 1.0}, shadows=["g1"] if setup == "router_shadow" else [])
                    _load(urls[setup], bodies[:50], conc)
                for rnd in range(args.rounds):
                    order = SETUPS[rnd % len(SETUPS):] + SETUPS[:rnd % len(SETUPS)]
                    for setup in order:
                        client.set_traffic({"g0": 1.0}, shadows=["g1"] if setup == "router_shadow" else [])
                        chunk = bodies[rnd * per_round:(rnd + 1) * per_round]
                        secs, lat, failed = _load(urls[setup], chunk, conc)
                        a = acc[setup]
                        a["seconds"] += secs
                        a["lat"] += lat
                        a["failed"] += failed
                        a["n"] += len(chunk)
                results[mode] = {s: {"rps": round(a["n"] / a["seconds"], 1),
                                     "p50_ms": round(float(np.percentile(a["lat"], 50)), 2),
                                     "p99_ms": round(float(np.percentile(a["lat"], 99)), 2),
                                     "failed": a["failed"]} for s, a in acc.items()}
            status = client.status()
            shadow = status["generations"]["g1"]["counters"]
            results["meta"] = {
                "requests_per_setup": per_round * args.rounds, "rows_per_request": 4,
                "concurrency": MODES, "rounds": args.rounds, "model": "mlp width 64 depth 2, digits (64 inputs)",
                "shadow_counters": {k: shadow[k] for k in ("requests_shadow", "shadow_errors",
                                                           "shadow_timeouts", "shadow_dropped", "compared")},
            }
    finally:
        serve.shutdown()
        ray.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    return 0


def render(results: dict) -> str:
    """Markdown table of the results, with the targets' ratios."""
    lines = ["| set-up | saturated rps | saturated p50 ms | saturated p99 ms | idle rps | idle p50 ms | idle p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for s in SETUPS:
        sat, idle = results["saturated"][s], results["idle"][s]
        lines.append(f"| {s} | {sat['rps']} | {sat['p50_ms']} | {sat['p99_ms']} | "
                     f"{idle['rps']} | {idle['p50_ms']} | {idle['p99_ms']} |")
    sat, idle = results["saturated"], results["idle"]
    lines += ["", f"router / composition, saturated: throughput {sat['router']['rps'] / sat['composition']['rps']:.2f}x "
                  f"(target >= 0.85), p50 {sat['router']['p50_ms'] / sat['composition']['p50_ms']:.2f}x (target <= 1.15)",
              f"router / composition, idle: throughput {idle['router']['rps'] / idle['composition']['rps']:.2f}x, "
              f"p50 {idle['router']['p50_ms'] / idle['composition']['p50_ms']:.2f}x",
              f"router_shadow / router, idle p50: {idle['router_shadow']['p50_ms'] / idle['router']['p50_ms']:.2f}x "
              f"(target <= 1.2); saturated rps {sat['router_shadow']['rps'] / sat['router']['rps']:.2f}x",
              f"router_local / plain, saturated: throughput {sat['router_local']['rps'] / sat['plain']['rps']:.2f}x, "
              f"p50 {sat['router_local']['p50_ms'] / sat['plain']['p50_ms']:.2f}x; idle p50 "
              f"{idle['router_local']['p50_ms'] / idle['plain']['p50_ms']:.2f}x"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
