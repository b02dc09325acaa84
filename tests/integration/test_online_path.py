"""The online path on real Ray Serve with two router replicas, over each durable log
(sqlite on this node, redis on a real redis-server with persistence on).

What is checked is what a rollout depends on: every answered request can be labelled
whichever replica answered it and whichever joins it; both replicas report the same
counters; and a router replica killed mid-traffic, the router application redeployed
mid-traffic, or (redis) the Redis server restarted mid-traffic lose no answered
request's row, and the controller's counters only ever go up, in one epoch.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests

from orchestrator.rollout.sources import COUNTER_FIELDS, counts_from_status
from serving.client import RouterClient
from serving.refs import ModelRef
from serving.specs import ServingSpec
from workers.checkpoint import load_model, save_model
from workers.data import load_dataset
from workers.models import build_model
from workers.specs import ArchSpec, DataSpec, TrainSpec
from workers.training import fit, predict
from tests.helpers import free_port, wait_for
from tests.redis_server import RedisServer

TOKEN = "online-admin-token-123"
ROWS = 3


def _train(ds, width: int, seed: int, path) -> ModelRef:
    model = build_model(ArchSpec(type="mlp", width=width, depth=1, embed_dim=8), ds.input_dim, ds.num_classes)
    fit(model, ds.train, TrainSpec(steps=60, batch_size=64, seed=seed))
    return ModelRef(path.name, str(path / "model.pt"), save_model(model, path))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gens")
    ds = load_dataset(DataSpec(source="digits", test_fraction=0.3, val_fraction=0.1))
    return ds, _train(ds, 16, 0, root / "g0"), _train(ds, 24, 1, root / "g1")


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def online(request, ray_session, models, tmp_path_factory):
    """Two router replicas (generations inside them, so four actors fit 2 CPUs) over one
    log; production g0, g1 in shadow."""
    from serving import deploy

    ds, g0, g1 = models
    root = tmp_path_factory.mktemp(f"online-{request.param}")
    server = None
    if request.param == "sqlite":
        log = {"prediction_log": "sqlite", "prediction_log_path": str(root / "predictions.sqlite")}
    else:
        server = RedisServer(persistence=True, directory=root / "redis").start()
        log = {"prediction_log": "redis", "redis_url": server.url}
    spec = ServingSpec(port=free_port(), router_replicas=2, router_cpus=0.25, in_router_models=True, **log)
    url = deploy.start_serving(spec, g0, [g1], admin_token=TOKEN)
    client = RouterClient(url, TOKEN)
    wait_for(lambda: len(client.status()["replicas"]) == 2, timeout_s=60)
    yield {"kind": request.param, "url": url, "client": client, "spec": spec, "ds": ds, "g0": g0, "g1": g1,
           "redis": server}
    client.close()
    deploy.stop_serving()
    if server is not None:
        server.close()


def _requests(ds, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` requests of ROWS test rows: (inputs, their labels)."""
    rng = np.random.default_rng(seed)
    idx = [rng.integers(0, len(ds.test), ROWS) for _ in range(n)]
    return [(ds.test.x[i], ds.test.y[i]) for i in idx]


class Traffic:
    """Predictions sent from `threads` threads until stopped: every 200 answer's request
    id with the rows it was for, and the status of every other answer."""

    def __init__(self, url: str, ds, threads: int = 2):
        self.url, self.ds, self.threads = url + "/v1/predict", ds, threads
        self.answered: list[tuple[str, np.ndarray]] = []
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(100 + seed)
        with requests.Session() as s:
            while not self._stop.is_set():
                idx = rng.integers(0, len(self.ds.test), ROWS)
                try:
                    r = s.post(self.url, json={"inputs": self.ds.test.x[idx].tolist()}, timeout=30)
                    out = (r.json()["request_id"], self.ds.test.y[idx]) if r.status_code == 200 else str(r.status_code)
                except requests.RequestException as e:
                    out = type(e).__name__
                with self._lock:
                    (self.answered if isinstance(out, tuple) else self.failed).append(out)

    def __enter__(self) -> "Traffic":
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(60)

    def count(self) -> int:
        with self._lock:
            return len(self.answered)


class Watch:
    """The controller's view through the drill: the router source's counts of g1 every
    0.3 s (a status call that fails is what the controller would call inconclusive)."""

    def __init__(self, client: RouterClient):
        self.client = client
        self.seen: list = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            try:
                self.seen.append(counts_from_status(self.client.status(), "g1"))
            except Exception:
                self.errors += 1

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def assert_continuous(self, min_reads: int = 5) -> None:
        """One epoch, and no counter ever goes down: `advance` never sees a reset."""
        assert len(self.seen) >= min_reads, f"only {len(self.seen)} status answers ({self.errors} failed)"
        assert {c.epoch for c in self.seen} == {self.seen[0].epoch}
        for a, b in zip(self.seen, self.seen[1:]):
            down = [k for k in COUNTER_FIELDS if getattr(b, k) < getattr(a, k)]
            assert not down, f"counters went down: {down} ({a} -> {b})"


def _label_all(client: RouterClient, answered) -> dict:
    """Labels for every answered request, in batches; the summed outcome counts."""
    total: dict = {}
    for i in range(0, len(answered), 200):
        out = client.feedback_batch([(rid, y.tolist()) for rid, y in answered[i:i + 200]])
        for k, v in out["outcomes"].items():
            total[k] = total.get(k, 0) + v
    return total


def _router_replicas() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::graceful#router#"))


def _offline(ref: ModelRef, x: np.ndarray) -> np.ndarray:
    model, _ = load_model(ref.uri, ref.sha256)
    return predict(model, x)[1].argmax(1)


def test_two_router_replicas_answer_join_and_count_as_one(online):
    """60 requests over HTTP; their labels posted once (a batch) and again (one by one:
    all duplicates); status asked until both replicas answered it: the same counters from
    each, equal to the offline recomputation of the shadow's flips."""
    client, ds, g0, g1 = online["client"], online["ds"], online["g0"], online["g1"]
    start = client.status()["generations"]["g1"]["counters"]
    sent = _requests(ds, 60, seed=1)
    answers = [client.predict(x.tolist()) for x, _ in sent]
    labels = [y for _, y in sent]
    outcomes = _label_all(client, [(a["request_id"], y) for a, y in zip(answers, labels)])
    assert outcomes["joined"] == 60 and outcomes["unknown"] == 0
    again = client.feedback(answers[0]["request_id"], labels[0].tolist())
    assert again["outcome"] == "duplicate"
    by_replica = {}
    deadline = time.monotonic() + 30
    while len(by_replica) < 2 and time.monotonic() < deadline:
        st = client.status()
        by_replica[st["replica"]] = st["generations"]["g1"]["counters"]
    assert len(by_replica) == 2, "one router replica answered every status call"
    first, second = by_replica.values()
    assert first == second
    x, y = np.concatenate([x for x, _ in sent]), np.concatenate(labels)
    p0, p1 = _offline(g0, x), _offline(g1, x)
    assert first["labelled"] - start["labelled"] == len(y)
    assert first["negative_flips"] - start["negative_flips"] == int(np.sum((p0 == y) & (p1 != y)))
    assert first["compared"] - start["compared"] == len(y)
    assert first["disagreements"] - start["disagreements"] == int(np.sum(p0 != p1))


def test_a_router_replica_killed_and_the_app_redeployed_mid_traffic_lose_no_answer(online):
    """Traffic from two clients; one router replica killed (Serve replaces it), then the
    router application deployed again (a rolling replacement of both): every answered
    request's labels join afterwards, and the controller's counters never go down."""
    import ray
    from ray import serve

    from serving import deploy

    client, ds = online["client"], online["ds"]
    victims = _router_replicas()
    assert len(victims) == 2
    with Watch(client) as watch, Traffic(online["url"], ds) as traffic:
        wait_for(lambda: traffic.count() >= 20, timeout_s=60)
        ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
        wait_for(lambda: victims[0] not in _router_replicas() and len(_router_replicas()) == 2, timeout_s=120)
        mark = traffic.count()
        wait_for(lambda: traffic.count() >= mark + 20, timeout_s=60)
        serve.run(deploy.router_application(online["spec"], online["g0"], [online["g1"]], admin_token=TOKEN),
                  name=deploy.ROUTER_APP, route_prefix="/")
        assert not set(victims) & set(_router_replicas())
        mark = traffic.count()
        wait_for(lambda: traffic.count() >= mark + 20, timeout_s=60)
    answered = traffic.answered
    outcomes = _label_all(client, answered)
    assert outcomes["joined"] == len(answered) and outcomes["unknown"] == 0, (outcomes, traffic.failed[:5])
    watch.assert_continuous()
    log = client.status()["prediction_log"]
    assert log["write_errors"] == 0
    print(f"\n[{online['kind']}] replica kill + redeploy: {len(answered)} answered, all joined; "
          f"{len(traffic.failed)} not answered ({sorted(set(traffic.failed))}); "
          f"{len(watch.seen)} status reads, {watch.errors} failed")


@pytest.mark.parametrize("online", ["redis"], indirect=True)
def test_a_redis_restart_mid_traffic_loses_no_answer(online):
    """Redis with persistence stops for about a second under traffic and comes back: the
    answers of meanwhile waited in the writers' retries, every answered request joins,
    nothing was dropped, and the counters go on in the same epoch."""
    client, server = online["client"], online["redis"]
    with Watch(client) as watch, Traffic(online["url"], online["ds"]) as traffic:
        wait_for(lambda: traffic.count() >= 20, timeout_s=60)
        server.stop()
        down_at, before = time.monotonic(), traffic.count()
        time.sleep(1.0)
        server.start()
        down_s, during = time.monotonic() - down_at, traffic.count() - before
        mark = traffic.count()
        wait_for(lambda: traffic.count() >= mark + 100, timeout_s=60)
    answered = traffic.answered
    outcomes = _label_all(client, answered)
    assert outcomes["joined"] == len(answered) and outcomes["unknown"] == 0, (outcomes, traffic.failed[:5])
    watch.assert_continuous(min_reads=3)
    log = client.status()["prediction_log"]
    assert log["write_errors"] == 0 and log["dropped"] == 0
    print(f"\n[redis] server down {down_s:.1f} s: {during} answered meanwhile; {len(answered)} answered in all, "
          f"all joined; {len(traffic.failed)} not answered; "
          f"{len(watch.seen)} status reads, {watch.errors} failed (the server was down)")
