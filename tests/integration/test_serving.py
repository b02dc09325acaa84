"""Real Ray Serve over 127.0.0.1: split, shadow, feedback join, faults, admin, metrics.

Small MLPs trained on scikit-learn digits in a few seconds and saved with
workers.checkpoint.save_model; expected counters are recomputed offline from the same
checkpoints, so every live counter is checked against an independent computation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from serving.client import RouterClient, RouterError
from serving.catalogue import create_catalogue
from serving.index import IndexSpec
from serving.refs import ModelRef
from serving.specs import ServingSpec
from workers.checkpoint import CheckpointError, load_model, save_model
from workers.data import load_dataset
from workers.models import build_model
from workers.specs import ArchSpec, DataSpec, TrainSpec
from workers.training import fit, predict
from tests.helpers import free_port, wait_for

TOKEN = "test-admin-token-123"


def _train(ds, width: int, seed: int, fraction: float, path):
    model = build_model(ArchSpec(type="mlp", width=width, depth=2, embed_dim=16), ds.input_dim, ds.num_classes)
    n = int(len(ds.train) * fraction)
    fit(model, ds.train.take(n), TrainSpec(steps=150, batch_size=64, seed=seed))
    sha = save_model(model, path)
    return ModelRef(path.name, str(path / "model.pt"), sha)


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from serving import deploy

    root = tmp_path_factory.mktemp("gens")
    ds = load_dataset(DataSpec(source="digits", test_fraction=0.3, val_fraction=0.1))
    g0 = _train(ds, 16, 0, 0.2, root / "g0")
    g1 = _train(ds, 32, 1, 1.0, root / "g1")
    m0, _ = load_model(g0.uri, g0.sha256)
    emb, _ = predict(m0, ds.gallery.x)
    spec = ServingSpec(port=free_port(), shadow_timeout_s=0.3, prediction_log_path=str(root / "predictions.sqlite"),
                       max_rows=64, max_body_bytes=64 * 1024, shadow_max_inflight=8)
    create_catalogue(root / "catalogue", IndexSpec(), "g0", emb, [f"item-{i}" for i in range(len(emb))], ds.gallery.y)
    url = deploy.start_serving(spec, g0, [g1], catalogue=root / "catalogue", admin_token=TOKEN)
    client = RouterClient(url, TOKEN)
    yield {"url": url, "client": client, "spec": spec, "ds": ds, "g0": g0, "g1": g1, "root": root}
    client.close()
    deploy.stop_serving()


def _offline_preds(ref: ModelRef, x: np.ndarray) -> np.ndarray:
    model, _ = load_model(ref.uri, ref.sha256)
    return predict(model, x)[1].argmax(1)


def _counters(client, gen):
    return client.status()["generations"][gen]["counters"]


def test_shadow_comparison_and_live_flips_match_offline(served):
    """40 requests of 4 rows go to production g0 and are mirrored to g1. Expected counts
    come from the same checkpoints offline: compared = 160 rows, disagreements =
    sum(g0 != g1), negative flips = sum(g0 == y and g1 != y), positive = the reverse."""
    client, ds = served["client"], served["ds"]
    before = _counters(client, "g1")
    x, y = ds.query.x[:160], ds.query.y[:160]
    rids = []
    for i in range(40):
        r = client.predict(x[4 * i:4 * i + 4].tolist(), user_id=f"u{i}")
        assert r["generation"] == "g0" and len(r["predictions"]) == 4
        assert np.allclose(np.sum(r["probabilities"], axis=1), 1.0, atol=1e-4)
        rids.append(r["request_id"])
    wait_for(lambda: _counters(client, "g1")["compared"] - before["compared"] >= 160)
    for i, rid in enumerate(rids):
        client.feedback(rid, y[4 * i:4 * i + 4].tolist())
    after = _counters(client, "g1")
    p0, p1 = _offline_preds(served["g0"], x), _offline_preds(served["g1"], x)
    delta = {k: after[k] - before[k] for k in after}
    assert delta["requests_shadow"] == 40
    assert delta["compared"] == 160
    assert delta["disagreements"] == int(np.sum(p0 != p1))
    assert delta["labelled"] == 160 and delta["labelled_requests"] == 40
    assert delta["negative_flips"] == int(np.sum((p0 == y) & (p1 != y)))
    assert delta["positive_flips"] == int(np.sum((p0 != y) & (p1 == y)))
    assert delta["production_correct"] == int(np.sum(p0 == y))
    assert delta["candidate_correct"] == int(np.sum(p1 == y))
    assert delta["negative_flips"] + delta["positive_flips"] > 0  # the models do differ
    # A request is labelled once: a second label is a duplicate, ignored; an id never
    # served is a 404.
    again = client.feedback(rids[0], y[:4].tolist())
    assert again["outcome"] == "duplicate" and _counters(client, "g1")["labelled"] == after["labelled"]
    with pytest.raises(RouterError) as e:
        client.feedback("never-served-id", y[:4].tolist())
    assert e.value.status == 404 and e.value.body["request_id"]


def test_traffic_split_is_sticky_and_atomic(served):
    """Half the users go to g1; each user always gets the same generation; a canary request
    is also mirrored to production so its flips are counted."""
    client, ds = served["client"], served["ds"]
    x = ds.query.x[:4].tolist()
    try:
        client.set_traffic({"g0": 0.5, "g1": 0.5}, shadows=[])
        first = {u: client.predict(x, user_id=f"user-{u}")["generation"] for u in range(60)}
        again = {u: client.predict(x, user_id=f"user-{u}")["generation"] for u in range(60)}
        assert first == again
        share = sum(g == "g1" for g in first.values()) / 60
        assert 0.3 < share < 0.7, share
        st = client.status()
        assert st["weights"] == {"g0": 0.5, "g1": 0.5} and st["shadows"] == []
        assert st["generations"]["g0"]["counters"]["requests_shadow"] > 0  # production mirrors
    finally:
        client.set_traffic({"g0": 1.0, "g1": 0.0}, shadows=["g1"])


def test_admin_routes_need_the_token(served):
    url = served["url"]
    body = {"weights": {"g0": 1.0}}
    assert requests.post(f"{url}/v1/admin/traffic", json=body, timeout=5).status_code == 401
    r = requests.post(f"{url}/v1/admin/traffic", json=body, headers={"Authorization": "Bearer wrong-token"}, timeout=5)
    assert r.status_code == 403 and "request_id" in r.json() and r.headers["x-request-id"]
    with pytest.raises(RouterError) as e:
        RouterClient(url, TOKEN).set_traffic({"g0": 0.7, "g1": 0.2})
    assert e.value.status == 400 and "sum to 1" in e.value.body["error"]
    with pytest.raises(RouterError) as e:
        RouterClient(url, TOKEN).set_traffic({"g0": 1.0, "nope": 0.0})
    assert "nope" in e.value.body["error"]


def _malformed(dim: int):
    good_row = [0.0] * dim
    yield "not json at all", "text/plain"
    yield "[1, 2, 3]", "application/json"
    yield "{\"inputs\": ", "application/json"
    yield json.dumps({}), "application/json"
    yield json.dumps({"inputs": []}), "application/json"
    yield json.dumps({"inputs": [[0.0] * (dim - 1)]}), "application/json"
    yield json.dumps({"inputs": [good_row, [0.0] * (dim + 1)]}), "application/json"
    yield json.dumps({"inputs": [good_row] * 65}), "application/json"
    yield json.dumps({"inputs": [["a"] * dim]}), "application/json"
    yield json.dumps({"inputs": [[True] * dim]}), "application/json"
    yield json.dumps({"inputs": [[None] * dim]}), "application/json"
    yield json.dumps({"inputs": [[[0.0]] * dim]}), "application/json"
    yield json.dumps({"inputs": "rows"}), "application/json"
    yield json.dumps({"inputs": [good_row], "user_id": {"a": 1}}), "application/json"
    yield "{\"inputs\": [[" + ",".join(["NaN"] * dim) + "]]}", "application/json"
    yield "{\"inputs\": [[" + ",".join(["1e400"] * dim) + "]]}", "application/json"
    yield json.dumps({"inputs": [[1e39] * dim]}), "application/json"
    yield "{" * 5000, "application/json"
    yield "x" * (70 * 1024), "application/json"
    yield b"\xff\xfe\x00garbage", "application/json"


def test_fuzz_malformed_requests_get_4xx_json_and_server_keeps_serving(served):
    """At least 200 malformed requests over every data route: each a 4xx JSON error with
    the request id, none a 5xx; then a good request still works."""
    url, ds = served["url"], served["ds"]
    cases = list(_malformed(ds.input_dim))
    feedback_cases = [json.dumps({"request_id": "nope", "labels": [1]}), json.dumps({"request_id": 3}),
                      json.dumps({"request_id": "x", "labels": [-1]}), json.dumps({"request_id": "x", "labels": "1"})]
    sent = 0
    with requests.Session() as s:
        for _ in range(4):
            for route in ("/v1/predict", "/v1/embed", "/v1/search"):
                for body, ctype in cases:
                    r = s.post(url + route, data=body, headers={"Content-Type": ctype}, timeout=10)
                    assert 400 <= r.status_code < 500, (route, body[:80], r.status_code, r.text[:200])
                    assert r.json()["error"] and r.json()["request_id"] == r.headers["x-request-id"]
                    sent += 1
            for body in feedback_cases:
                r = s.post(url + "/v1/feedback", data=body, timeout=10)
                assert 400 <= r.status_code < 500 and r.json()["error"]
                sent += 1
        r = s.get(url + "/v1/nowhere", timeout=10)
        assert r.status_code == 404 and r.json()["request_id"]
    assert sent >= 200
    ok = requests.post(url + "/v1/predict", json={"inputs": ds.query.x[:2].tolist()}, timeout=10)
    # an answer's id is the router's own (labels join by it), never one the client chose
    ok = requests.post(url + "/v1/predict", json={"inputs": ds.query.x[:2].tolist()},
                       headers={"X-Request-ID": "chosen-by-client"}, timeout=10)
    assert ok.status_code == 200 and len(ok.json()["request_id"]) == 32
    assert ok.json()["request_id"] != "chosen-by-client"


def test_search_finds_gallery_items_with_the_production_model(served):
    """A gallery row embedded by g0 (the gallery's own model) finds itself at rank 1."""
    client, ds = served["client"], served["ds"]
    r = client.search(ds.gallery.x[:5].tolist(), k=3)
    assert r["gallery_generation"] == "g0"
    assert [ids[0] for ids in r["ids"]] == [f"item-{i}" for i in range(5)]
    assert all(abs(s[0] - 1.0) < 1e-3 for s in r["scores"])
    assert [lab[0] for lab in r["labels"]] == ds.gallery.y[:5].tolist()
    e = client.embed(ds.query.x[:2].tolist())
    assert np.allclose(np.linalg.norm(e["embeddings"], axis=1), 1.0, atol=1e-4)


def _predict_n(session, url, x, n):
    """`n` requests; production g0 answers every one."""
    for _ in range(n):
        r = session.post(url + "/v1/predict", json={"inputs": x}, timeout=10)
        assert r.status_code == 200 and r.json()["generation"] == "g0"


@pytest.mark.parametrize("fault,counter", [({"error": True}, "shadow_errors"),
                                           ({"delay_s": 0.6}, "shadow_timeouts")])
def test_faulty_shadow_never_touches_the_primary(served, fault, counter):
    """A candidate that raises on every request, or is slower than the 0.3 s shadow timeout:
    every primary answer succeeds and the failures are counted; only requests sent while it
    shadows are mirrored to it. (What it costs the primary's latency is a measurement, not a
    test: benchmarks/serving_overhead.py, "faulty shadow vs none".)"""
    from serving import deploy

    client, ds, spec = served["client"], served["ds"], served["spec"]
    name = "bad-" + counter.replace("_", "")
    bad = ModelRef(name, served["g1"].uri, served["g1"].sha256)
    deploy.add_generation(bad, spec, shadow=True, inject_fault=fault)
    x = ds.query.x[:4].tolist()
    try:
        with requests.Session() as s:
            client.set_traffic({"g0": 1.0}, shadows=[])
            _predict_n(s, served["url"], x, 10)
            for _ in range(5):  # shadow on and off: 60 requests mirrored in all
                client.set_traffic({"g0": 1.0}, shadows=[])
                _predict_n(s, served["url"], x, 12)
                client.set_traffic({"g0": 1.0}, shadows=[name])
                _predict_n(s, served["url"], x, 12)
        # With at most 8 shadows in flight, copies beyond that are dropped (and counted).
        c = wait_for(lambda: (lambda c: c if c[counter] >= c["requests_shadow"] else None)(
            _counters(client, name)), 15)
        assert c["requests_shadow"] + c["shadow_dropped"] == 60 and c["requests_shadow"] >= 8
        assert c["compared"] == 0 and c["requests_primary"] == 0 and c["shadow_errors" if counter == "shadow_timeouts" else "shadow_timeouts"] == 0
        if fault.get("error"):
            # As a canary taking all traffic, it fails every call and production answers.
            client.set_traffic({"g0": 0.0, name: 1.0}, shadows=[])
            for i in range(5):
                assert client.predict(x, user_id=f"c{i}")["generation"] == "g0"
            c = _counters(client, name)
            assert c["requests_primary"] == c["errors"] == c["fallbacks"] == 5
    finally:
        client.set_traffic({"g0": 1.0}, shadows=["g1"])
        deploy.remove_generation(name)
    st = client.status()
    assert name not in st["weights"] and st["generations"][name]["attached"] is False


def test_in_router_models_answer_like_the_deployments(served):
    """serving.in_router_models: the same checkpoint loaded inside a second router (own
    route prefix) gives the same predictions as the g0 deployment, with no model app."""
    from serving import deploy

    spec, ds = served["spec"], served["ds"]
    # its own prediction log: routers sharing one would share their counters
    local_spec = spec.model_copy(update={"in_router_models": True,
                                         "prediction_log_path": str(served["root"] / "local.sqlite")})
    url = deploy.start_serving(local_spec, served["g0"], [served["g1"]],
                               admin_token=TOKEN, app_name="local-router", route_prefix="/local")
    try:
        x = ds.query.x[:8].tolist()
        local, remote = RouterClient(url, TOKEN), served["client"]
        assert local.predict(x)["predictions"] == remote.predict(x)["predictions"]
        assert wait_for(lambda: local.status()["generations"]["g1"]["counters"]["compared"] == 8)
    finally:
        from ray import serve

        serve.delete("local-router")


def test_fusion_answers_with_the_weighted_mix(served):
    """fusion_weight 0.25 with all traffic on g1: the answer is 0.75 * p(g0) + 0.25 * p(g1),
    recomputed offline from both checkpoints."""
    from ray import serve

    from serving import deploy
    from workers.training import predict as offline

    spec, ds, g0, g1 = served["spec"], served["ds"], served["g0"], served["g1"]
    fspec = spec.model_copy(update={"in_router_models": True, "fusion_weight": 0.25})
    url = deploy.start_serving(fspec, g0, [g1], weights={"g0": 0.0, "g1": 1.0}, shadows=[],
                               admin_token=TOKEN, app_name="fusion-router", route_prefix="/fusion")
    try:
        x = ds.query.x[:6]
        r = RouterClient(url).predict(x.tolist())
        p = [np.exp(offline(load_model(ref.uri, ref.sha256)[0], x)[1]) for ref in (g0, g1)]
        p = [q / q.sum(1, keepdims=True) for q in p]
        expected = 0.75 * p[0] + 0.25 * p[1]
        assert r["generation"] == "g1"
        assert np.allclose(r["probabilities"], expected, atol=1e-4)
        assert r["predictions"] == expected.argmax(1).tolist()
    finally:
        serve.delete("fusion-router")


def test_http_attach_checks_the_served_checkpoint(served):
    """Admin attach over HTTP: refused when the app serves another sha256 (409) or does not
    exist (404); accepted with the right one, then detached over HTTP."""
    from serving import deploy

    client, g1 = served["client"], served["g1"]
    ref = ModelRef("g1copy", g1.uri, g1.sha256)
    app = deploy.deploy_generation(ref, served["spec"])
    try:
        with pytest.raises(RouterError) as e:
            client.attach("g1copy", app, "0" * 64)
        assert e.value.status == 409 and "sha256" in e.value.body["error"]
        with pytest.raises(RouterError) as e:
            client.attach("g1copy", "no-such-app", g1.sha256)
        assert e.value.status == 404
        plan = client.attach("g1copy", app, g1.sha256, shadow=False)
        assert plan["weights"]["g1copy"] == 0.0 and "g1copy" not in plan["shadows"]
        with pytest.raises(RouterError) as e:
            client.detach("g0")
        assert e.value.status == 409
        assert "g1copy" not in client.detach("g1copy")["weights"]
    finally:
        from ray import serve

        serve.delete(app)


def test_tampered_checkpoint_is_never_served(served):
    from serving import deploy

    root = served["root"]
    src = root / "g1" / "model.pt"
    bad_dir = root / "tampered"
    bad_dir.mkdir(exist_ok=True)
    data = bytearray(src.read_bytes())
    data[-10] ^= 0xFF
    (bad_dir / "model.pt").write_bytes(bytes(data))
    ref = ModelRef("tampered", str(bad_dir / "model.pt"), served["g1"].sha256)
    with pytest.raises(CheckpointError):
        deploy.add_generation(ref, served["spec"])
    assert "tampered" not in served["client"].status()["weights"]


def test_router_metrics_on_rays_prometheus_endpoint(served, ray_session):
    """Every name in serving.metric_names.EXPORTED appears on the node's metrics port."""
    from serving.metric_names import EXPORTED

    node = next(n for n in ray_session.nodes() if n["Alive"])
    port = node["MetricsExportPort"]
    client, ds = served["client"], served["ds"]
    r = client.predict(ds.query.x[:4].tolist())
    client.feedback(r["request_id"], ds.query.y[:4].tolist())
    requests.post(served["url"] + "/v1/predict", data="bad", timeout=5)

    # Ray exports a counter only once it was incremented (inc(0) is refused), and nothing
    # here makes the router drop a shadow copy: that counter is required only if it did.
    dropped = sum(g.get("counters", {}).get("shadow_dropped", 0)
                  for g in client.status().get("generations", {}).values())
    wanted = set(EXPORTED) - (set() if dropped else {"ray_graceful_shadow_dropped_total"})

    def names():
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        found = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
        return found if wanted <= found else None

    try:
        wait_for(names, 40)
    except AssertionError:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        have = sorted({l.split("{")[0] for l in text.splitlines() if "graceful" in l and l[0] != "#"})
        pytest.fail(f"missing {sorted(wanted - set(have))}; exported graceful names: {have}")
