"""Real Ray Serve over 127.0.0.1, models of any input shape: an image production (cnn2d on
(1, 8, 8)) and a candidate of another architecture with the same input shape (a user's
backbone by import path, `tests.factories:backbone`) answer requests sent as JSON nested
lists and as npy bodies; a wrong shape is a 400 naming both shapes; a candidate of
another input shape is refused when it is attached (409). Untrained weights: every
answer is checked against the same checkpoint's offline output.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
import torch

from serving.client import RouterClient, RouterError
from serving.core import NPY_CONTENT_TYPE, USER_HEADER
from serving.catalogue import create_catalogue
from serving.index import IndexSpec
from serving.refs import ModelRef, app_name_for
from serving.specs import ServingSpec
from workers.checkpoint import BUILTIN, save_model
from workers.models import build_model
from workers.specs import ArchSpec
from tests.helpers import free_port, wait_for

TOKEN = "shapes-admin-token-1"
SHAPE = (1, 8, 8)
CUSTOM = "tests.factories:backbone"


def _save(arch: ArchSpec, shape, path, seed: int) -> tuple[ModelRef, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model(arch, shape, 3).eval()
    sha = save_model(model, path)
    return ModelRef(path.name, str(path / "model.pt"), sha, arch.checkpoint_factory), model


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from serving import deploy

    root = tmp_path_factory.mktemp("shapes")
    g0, m0 = _save(ArchSpec(type="cnn2d", width=4, depth=1, embed_dim=8), SHAPE, root / "g0", 0)
    g1, m1 = _save(ArchSpec(type="custom", factory=CUSTOM, kwargs={"width": 4}, embed_dim=8), SHAPE, root / "g1", 1)
    flat, _ = _save(ArchSpec(type="mlp", width=8, depth=1, embed_dim=8), (64,), root / "flat", 2)
    assert (g0.factory, g1.factory) == (BUILTIN, CUSTOM)
    gx = _images(6, seed=9)
    with torch.no_grad():
        create_catalogue(root / "catalogue", IndexSpec(), "g0", m0.embed(torch.from_numpy(gx)).numpy(), range(6),
                         np.arange(6) % 3)
    spec = ServingSpec(port=free_port(), max_rows=16, max_body_bytes=64 * 1024, shadow_timeout_s=2.0,
                       prediction_log_path=str(root / "predictions.sqlite"))
    url = deploy.start_serving(spec, g0, [g1], catalogue=root / "catalogue", admin_token=TOKEN)
    client = RouterClient(url, TOKEN)
    yield {"url": url, "client": client, "spec": spec, "g0": g0, "m0": m0, "m1": m1, "flat": flat, "gx": gx}
    client.close()
    deploy.stop_serving()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_image_requests_as_nested_lists_and_npy_are_served_and_shadowed(served):
    """5 images sent as JSON nested lists, as an npy body (the client's ndarray path) and
    as a raw npy POST with the user id header: production g0 answers each with its offline
    probabilities; the custom candidate g1 shadows all 15 rows."""
    client, url = served["client"], served["url"]
    x = _images(5)
    with torch.no_grad():
        want = torch.softmax(served["m0"](torch.from_numpy(x)), -1).numpy()
    before = client.status()["generations"]["g1"]["counters"]["compared"]
    as_json = client.predict(x.tolist())
    as_npy = client.predict(x)
    raw = requests.post(url + "/v1/predict", data=_npy(x), timeout=10,
                        headers={"Content-Type": NPY_CONTENT_TYPE, USER_HEADER: "user-7"})
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json"
    for r in (as_json, as_npy, raw.json()):
        assert r["generation"] == "g0" and r["predictions"] == want.argmax(1).tolist()
        np.testing.assert_allclose(r["probabilities"], want, atol=1e-5)
    st = wait_for(lambda: (lambda s: s if s["generations"]["g1"]["counters"]["compared"] - before >= 15 else None)(
        client.status()), 15.0)
    assert st["input_shape"] == [1, 8, 8]
    assert st["generations"]["g1"]["counters"]["shadow_errors"] == 0


def test_embed_and_search_take_npy_bodies(served):
    client, gx = served["client"], served["gx"]
    e_json, e_npy = client.embed(gx[:3].tolist()), client.embed(gx[:3])
    np.testing.assert_allclose(e_json["embeddings"], e_npy["embeddings"], atol=1e-6)
    hits = client.search(gx[:3], k=2)  # k travels in the query string
    assert [len(ids) for ids in hits["ids"]] == [2, 2, 2] and [ids[0] for ids in hits["ids"]] == ["0", "1", "2"]


def test_wrong_shapes_dtypes_and_malformed_npy_are_400s(served):
    url = served["url"]
    want = "inputs: expected shape [N, 1, 8, 8] (rows of shape [1, 8, 8])"
    flat = np.zeros((3, 64), np.float32)
    cases = [
        ({"json": {"inputs": flat.tolist()}}, f"{want}, got [3, 64]"),
        ({"data": _npy(flat), "headers": {"Content-Type": NPY_CONTENT_TYPE}}, f"{want}, got [3, 64]"),
        ({"data": _npy(np.full((2, *SHAPE), "a")), "headers": {"Content-Type": NPY_CONTENT_TYPE}},
         "is not a number type"),
        ({"data": _npy(np.full((2, *SHAPE), np.nan, np.float32)), "headers": {"Content-Type": NPY_CONTENT_TYPE}},
         "NaN or infinite"),
        ({"data": _npy(_images(2))[:-7], "headers": {"Content-Type": NPY_CONTENT_TYPE}}, "npy body: malformed"),
        ({"data": b"\x93NUMPY\x01\x00garbage", "headers": {"Content-Type": NPY_CONTENT_TYPE}},
         "npy body: malformed header"),
        ({"data": b"not an array", "headers": {"Content-Type": NPY_CONTENT_TYPE}}, "body is not an .npy array"),
    ]
    with requests.Session() as s:
        for route in ("/v1/predict", "/v1/embed", "/v1/search"):
            for kw, msg in cases:
                r = s.post(url + route, timeout=10, **kw)
                assert r.status_code == 400, (route, msg, r.status_code, r.text[:300])
                assert msg in r.json()["error"] and r.json()["request_id"] == r.headers["x-request-id"]
        r = s.post(url + "/v1/predict", data=_npy(_images(17)), headers={"Content-Type": NPY_CONTENT_TYPE}, timeout=10)
        assert r.status_code == 413 and "at most 16" in r.json()["error"]
    assert served["client"].predict(_images(1))["generation"] == "g0"  # still serving


def test_a_candidate_of_another_input_shape_is_refused_when_attached(served):
    """A flat (64,) model deployed as its own app: the router's admin attach answers 409
    naming both shapes, and `add_generation` raises and deletes the app it deployed."""
    from ray import serve

    from serving import deploy

    client, spec, flat = served["client"], served["spec"], served["flat"]
    app = deploy.deploy_generation(flat, spec)
    try:
        with pytest.raises(RouterError) as e:
            client.attach("flat", app, flat.sha256)
        assert e.value.status == 409
        assert "takes inputs of shape [64], production (the router) [1, 8, 8]" in e.value.body["error"]
        with pytest.raises(Exception, match=r"takes inputs of shape \[64\]"):
            deploy.add_generation(flat, spec)
        assert app_name_for("flat") not in serve.status().applications
    finally:
        if app_name_for("flat") in serve.status().applications:
            serve.delete(app)
    st = client.status()
    assert "flat" not in st["weights"] and sorted(st["weights"]) == ["g0", "g1"]
