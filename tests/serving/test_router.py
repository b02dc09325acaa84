"""The router in-process, without Ray or Serve: its generations hosted in it
(`serving.in_router_models`), its route handlers called with real Starlette requests.

An image-shaped production (cnn2d on (1, 8, 8)) and a candidate of another architecture
(an mlp built for the same shape) serve requests sent as JSON nested lists and as npy
bodies; wrong shapes are 400s naming both shapes, and a generation of another input shape
is refused when it is attached. The same paths over HTTP on real Serve:
tests/integration/test_serving_shapes.py.
"""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
import torch
from starlette.requests import Request

from serving.core import NPY_CONTENT_TYPE, USER_HEADER, BadRequest
from serving.catalogue import add_items, create_catalogue
from serving.index import IndexSpec
from serving.refs import ModelRef
from serving.specs import ServingSpec
from workers.checkpoint import BUILTIN, CheckpointError, save_model
from workers.models import build_model
from workers.specs import ArchSpec

SHAPE = (1, 8, 8)
TOKEN = "router-test-token-1"


def _router_class():
    """The class `@serve.ingress` wrapped: constructed like any object (the wrapper's
    constructor needs a Serve replica)."""
    from serving.router import Router

    return next(c for c in Router.__mro__ if "predict" in vars(c))


def _save(arch: ArchSpec, shape, path, seed: int) -> tuple[ModelRef, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model(arch, shape, 3).eval()
    sha = save_model(model, path)
    return ModelRef(path.name, str(path), sha, BUILTIN), model


@pytest.fixture(scope="module")
def gens(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return {
        "g0": _save(ArchSpec(type="cnn2d", width=4, depth=1, embed_dim=8), SHAPE, root / "g0", 0),
        "g1": _save(ArchSpec(type="mlp", width=16, depth=1, embed_dim=8), SHAPE, root / "g1", 1),
        "flat": _save(ArchSpec(type="mlp", width=16, depth=1, embed_dim=8), (64,), root / "flat", 2),
    }


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


def _catalogue(path, model, x) -> str:
    """A flat catalogue of `model`'s embeddings of `x`, ids "0".."n-1", labels i % 3."""
    with torch.no_grad():
        create_catalogue(path, IndexSpec(), "g0", model.embed(torch.from_numpy(x)).numpy(), range(len(x)),
                         np.arange(len(x)) % 3)
    return str(path)


@pytest.fixture
def router(gens, tmp_path):
    _, m0 = gens["g0"]
    x = _images(6, seed=9)
    gallery = _catalogue(tmp_path / "catalogue", m0, x)
    spec = ServingSpec(in_router_models=True, max_rows=8, max_body_bytes=16 * 1024,
                       prediction_log="memory").model_dump(mode="json")
    infos = {n: {"app": None, "sha256": r.sha256, "uri": r.uri, "factory": r.factory}
             for n, (r, _) in gens.items() if n in ("g0", "g1")}
    r = _router_class()(spec, SHAPE, "g0", infos, {"g0": 1.0, "g1": 0.0}, ["g1"], gallery, TOKEN)
    r.gallery_x = x
    return r


def _request(path: str, body: bytes, ctype: str = "application/json", headers: dict | None = None,
             query: str = "") -> Request:
    hdrs = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": path, "headers": hdrs, "query_string": query.encode(),
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1)}
    return Request(scope, receive)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


async def _post(handler, path: str, body: bytes, **kw) -> tuple[int, dict]:
    resp = await handler(_request(path, body, **kw))
    return resp.status_code, json.loads(resp.body)


def _json(x) -> bytes:
    return json.dumps({"inputs": x.tolist() if isinstance(x, np.ndarray) else x}).encode()


def test_image_requests_as_nested_lists_and_as_npy_get_the_same_answers(router, gens):
    """4 images (1, 8, 8): the JSON and the npy request are answered by production g0 with
    its own offline probabilities, and both are mirrored to the mlp candidate g1 (8 rows
    compared)."""
    x = _images(4)
    with torch.no_grad():
        want = torch.softmax(gens["g0"][1](torch.from_numpy(x)), -1).numpy()

    async def run():
        as_json = await _post(router.predict, "/v1/predict", _json(x))
        as_npy = await _post(router.predict, "/v1/predict", _npy(x), ctype=NPY_CONTENT_TYPE)
        await asyncio.sleep(0.2)  # shadow copies are coalesced for 5 ms, then compared
        return as_json, as_npy

    (s1, r1), (s2, r2) = asyncio.run(run())
    assert s1 == s2 == 200 and r1["generation"] == r2["generation"] == "g0"
    np.testing.assert_allclose(r1["probabilities"], want, atol=1e-5)
    np.testing.assert_allclose(r2["probabilities"], want, atol=1e-5)
    assert r1["predictions"] == r2["predictions"] == want.argmax(1).tolist()
    st = router.status()
    assert st["input_shape"] == [1, 8, 8]
    c = st["generations"]["g1"]["counters"]
    assert c["requests_shadow"] == 2 and c["compared"] == 8 and c["shadow_errors"] == 0


def test_an_npy_request_takes_its_user_id_from_the_header(router):
    """Half the users on the candidate: a user sent as X-Graceful-User with an npy body
    lands where the same user_id in a JSON body does."""
    router.set_traffic({"g0": 0.5, "g1": 0.5}, shadows=[])
    x = _images(1)

    async def run():
        out = []
        for u in range(16):
            _, a = await _post(router.predict, "/v1/predict", json.dumps({"inputs": x.tolist(), "user_id": f"u{u}"}).encode())
            _, b = await _post(router.predict, "/v1/predict", _npy(x), ctype=NPY_CONTENT_TYPE,
                               headers={USER_HEADER: f"u{u}"})
            out.append((a["generation"], b["generation"]))
        return out

    pairs = asyncio.run(run())
    assert all(a == b for a, b in pairs) and {a for a, _ in pairs} == {"g0", "g1"}


def test_embed_and_search_take_npy_bodies_with_k_in_the_query(router):
    x = router.gallery_x[:3]

    async def run():
        e_json = await _post(router.embed, "/v1/embed", _json(x))
        e_npy = await _post(router.embed, "/v1/embed", _npy(x), ctype=NPY_CONTENT_TYPE)
        s_npy = await _post(router.search, "/v1/search", _npy(x), ctype=NPY_CONTENT_TYPE, query="k=2")
        bad_k = await _post(router.search, "/v1/search", _npy(x), ctype=NPY_CONTENT_TYPE, query="k=two")
        return e_json, e_npy, s_npy, bad_k

    (s1, e1), (s2, e2), (s3, hits), (s4, bad) = asyncio.run(run())
    assert s1 == s2 == s3 == 200
    np.testing.assert_allclose(e1["embeddings"], e2["embeddings"], atol=1e-6)
    assert [len(ids) for ids in hits["ids"]] == [2, 2, 2] and [ids[0] for ids in hits["ids"]] == ["0", "1", "2"]
    assert s4 == 400 and "k: must be an integer" in bad["error"]


def test_wrong_shapes_dtypes_and_bodies_are_400s_naming_both_shapes(router):
    want = "inputs: expected shape [N, 1, 8, 8] (rows of shape [1, 8, 8])"
    flat = np.zeros((3, 64), np.float32)
    cases = [
        (_json(flat), "application/json", 400, f"{want}, got [3, 64]"),
        (_npy(flat), NPY_CONTENT_TYPE, 400, f"{want}, got [3, 64]"),
        (_npy(np.full((1, *SHAPE), "x")), NPY_CONTENT_TYPE, 400, "is not a number type"),
        (_npy(np.full((1, *SHAPE), np.inf, np.float32)), NPY_CONTENT_TYPE, 400, "NaN or infinite"),
        (_npy(_images(2))[:-5], NPY_CONTENT_TYPE, 400, "npy body: malformed"),
        (b"\x93NUMPY\x01\x00\xff\x00{nope", NPY_CONTENT_TYPE, 400, "npy body: malformed header"),
        (_json(_images(2)), NPY_CONTENT_TYPE, 400, "body is not an .npy array"),
        (_npy(_images(2)), "application/json", 400, "body is not valid JSON"),
        (_npy(_images(9)), NPY_CONTENT_TYPE, 413, "9 rows, at most 8"),
        (_npy(_images(80)), NPY_CONTENT_TYPE, 413, "body larger than 16384 bytes"),
    ]

    async def run():
        out = []
        for body, ctype, _, _ in cases:
            for handler, path in ((router.predict, "/v1/predict"), (router.embed, "/v1/embed"),
                                  (router.search, "/v1/search")):
                out.append(await _post(handler, path, body, ctype=ctype))
        ok = await _post(router.predict, "/v1/predict", _npy(_images(1)), ctype=NPY_CONTENT_TYPE)
        return out, ok

    out, ok = asyncio.run(run())
    for i, (status, body) in enumerate(out):
        _, _, want_status, msg = cases[i // 3]
        assert status == want_status and msg in body["error"] and body["request_id"], (i, status, body)
    assert ok[0] == 200  # and the router keeps serving


def test_a_generation_of_another_input_shape_is_refused_when_attached(router, gens):
    """Another architecture with production's shape attaches; a flat (64,) model is a 409
    naming both shapes; a ref naming another factory than its checkpoint's never loads."""
    flat, _ = gens["flat"]
    with pytest.raises(BadRequest) as e:
        asyncio.run(router.attach_local(flat))
    assert e.value.status == 409 and "takes inputs of shape [64], production (the router) [1, 8, 8]" in str(e.value)
    assert "flat" not in router.gens
    g1, _ = gens["g1"]
    plan = asyncio.run(router.attach_local(ModelRef("g1copy", g1.uri, g1.sha256, BUILTIN)))
    assert "g1copy" in plan["shadows"]
    with pytest.raises(CheckpointError, match="factory"):
        asyncio.run(router.attach_local(ModelRef("g1other", g1.uri, g1.sha256, "mypkg.models:build")))


def test_a_router_is_not_built_over_a_candidate_of_another_input_shape(gens):
    """`serving.deploy.router_application` (what start_serving and the RayService builder
    deploy) refuses, before anything starts, a candidate whose checkpoint records another
    input shape; one of another architecture and the same shape binds, with the shape."""
    from serving.deploy import router_application

    (g0, _), (g1, _), (flat, _) = gens["g0"], gens["g1"], gens["flat"]
    with pytest.raises(CheckpointError, match=r"flat: takes inputs of shape \[64\], production g0 \[1, 8, 8\]"):
        router_application(ServingSpec(), g0, [flat])
    args = router_application(ServingSpec(), g0, [g1])._bound_deployment.init_args
    assert args[1] == SHAPE and args[3]["g1"]["factory"] == BUILTIN


def _router_of(tmp_path, prod: tuple[ArchSpec, int], cand: tuple[ArchSpec, int], weights: dict, shadows: list,
               **spec_kw):
    """A router over production g0 and candidate g1 built here (arch, classes), and a
    gallery of 6 images embedded by g0."""
    models = {}
    for seed, (name, (arch, classes)) in enumerate((("g0", prod), ("g1", cand))):
        torch.manual_seed(seed)
        m = build_model(arch, SHAPE, classes).eval()
        models[name] = (ModelRef(name, str(tmp_path / name), save_model(m, tmp_path / name), BUILTIN), m)
    x = _images(6, seed=9)
    gallery = _catalogue(tmp_path / "catalogue", models["g0"][1], x)
    spec = ServingSpec(in_router_models=True, max_rows=8, prediction_log="memory", **spec_kw).model_dump(mode="json")
    infos = {n: {"app": None, "sha256": r.sha256, "uri": r.uri, "factory": r.factory} for n, (r, _) in models.items()}
    r = _router_class()(spec, SHAPE, "g0", infos, weights, shadows, gallery, TOKEN)
    r.gallery_x = x
    return r, models


def test_fusion_with_a_candidate_of_more_classes_pads_production(tmp_path):
    """Fusion on, production of 10 classes, a canary of 12: the canary answers 200 with 12
    fused columns (production's 0 on the two classes it does not know); as a shadow the
    same candidate is compared without errors."""
    mlp = ArchSpec(type="mlp", width=16, depth=1, embed_dim=8)
    r, models = _router_of(tmp_path, (mlp, 10), (mlp, 12), {"g0": 0.0, "g1": 1.0}, [], fusion_weight=0.5)
    x = _images(3)
    with torch.no_grad():
        p0, p1 = (torch.softmax(models[g][1](torch.from_numpy(x)), -1).numpy() for g in ("g0", "g1"))
    want = 0.5 * np.pad(p0, ((0, 0), (0, 2))) + 0.5 * p1

    async def run():
        canary = await _post(r.predict, "/v1/predict", _json(x))
        await asyncio.sleep(0.2)
        r.set_traffic({"g0": 1.0, "g1": 0.0}, shadows=["g1"])
        shadowed = await _post(r.predict, "/v1/predict", _json(x))
        await asyncio.sleep(0.2)  # the shadow copy is coalesced for 5 ms, then fused and compared
        return canary, shadowed

    (s1, canary), (s2, shadowed) = asyncio.run(run())
    assert s1 == 200 and canary["generation"] == "g1", canary
    np.testing.assert_allclose(canary["probabilities"], want, atol=1e-5)
    assert canary["predictions"] == want.argmax(1).tolist()
    assert s2 == 200 and shadowed["generation"] == "g0" and len(shadowed["probabilities"][0]) == 10
    c = r.status()["generations"]["g1"]["counters"]
    assert c["compared"] == 6 and c["shadow_errors"] == 0 and c["errors"] == 0


def test_search_by_a_generation_of_another_embedding_size_is_a_409(tmp_path):
    """The catalogue holds g0's 8-dimensional embeddings; g1 embeds into 12. A search g1
    answers is a 409 naming both sizes (never faiss's AssertionError, a 500); g1 still
    embeds, and g0 still searches."""
    r, _ = _router_of(tmp_path, (ArchSpec(type="cnn2d", width=4, depth=1, embed_dim=8), 3),
                      (ArchSpec(type="mlp", width=16, depth=1, embed_dim=12), 3), {"g0": 0.0, "g1": 1.0}, [])
    x = r.gallery_x[:2]

    async def run():
        bad = await _post(r.search, "/v1/search", _json(x))
        bad_npy = await _post(r.search, "/v1/search", _npy(x), ctype=NPY_CONTENT_TYPE, query="k=2")
        emb = await _post(r.embed, "/v1/embed", _json(x))
        r.set_traffic({"g0": 1.0, "g1": 0.0})
        ok = await _post(r.search, "/v1/search", _json(x))
        return bad, bad_npy, emb, ok

    (s1, bad), (s2, bad_npy), (s3, emb), (s4, ok) = asyncio.run(run())
    msg = "g1 embeds into 12 dimensions, the catalogue (g0) holds 8; it cannot search this catalogue"
    assert s1 == s2 == 409 and msg in bad["error"] and msg in bad_npy["error"] and bad["request_id"]
    assert s3 == 200 and emb["generation"] == "g1" and len(emb["embeddings"][0]) == 12
    assert s4 == 200 and ok["generation"] == "g0" and [ids[0] for ids in ok["ids"]] == ["0", "1"]


def test_a_request_naming_a_generation_is_answered_by_it_and_an_unknown_one_is_a_404(tmp_path):
    """Production g0 takes all traffic; `generation: g1` (an edge model, say) embeds and
    searches with g1 all the same, in the JSON body or in an npy body's query string; a
    generation not served here is a 404 naming the served ones."""
    mlp = ArchSpec(type="mlp", width=16, depth=1, embed_dim=8)
    r, models = _router_of(tmp_path, (mlp, 3), (mlp, 3), {"g0": 1.0, "g1": 0.0}, [])
    x = r.gallery_x[:2]
    body = lambda g: json.dumps({"inputs": x.tolist(), "generation": g}).encode()  # noqa: E731

    async def run():
        return (await _post(r.embed, "/v1/embed", body("g1")), await _post(r.embed, "/v1/embed", _json(x)),
                await _post(r.search, "/v1/search", _npy(x), ctype=NPY_CONTENT_TYPE, query="generation=g1"),
                await _post(r.search, "/v1/search", body("g9")))

    (s1, e1), (s2, e0), (s3, hits), (s4, bad) = asyncio.run(run())
    with torch.no_grad():
        want = models["g1"][1].embed(torch.from_numpy(x)).numpy()
    assert s1 == s2 == s3 == 200 and e1["generation"] == "g1" and e0["generation"] == "g0"
    np.testing.assert_allclose(e1["embeddings"], want, atol=1e-5)
    assert hits["generation"] == "g1" and hits["gallery_generation"] == "g0"
    assert s4 == 404 and "'g9' is not served here; served: ['g0', 'g1']" in bad["error"]


def test_items_added_to_the_catalogue_are_searched_after_the_refresh_interval(tmp_path):
    """Three items appended (by g1) to the catalogue a router serves: the router answers
    from version 1 until catalogue_refresh_s has passed, then from version 2, where the
    new items are found by their ids."""
    mlp = ArchSpec(type="mlp", width=16, depth=1, embed_dim=8)
    r, models = _router_of(tmp_path, (mlp, 3), (mlp, 3), {"g0": 1.0, "g1": 0.0}, [], catalogue_refresh_s=0.2)
    new = _images(3, seed=11)
    with torch.no_grad():
        add_items(tmp_path / "catalogue", "g1", models["g0"][1].embed(torch.from_numpy(new)).numpy(),
                  ["new-a", "new-b", "new-c"])

    async def run():
        first = await _post(r.search, "/v1/search", _json(new))
        await asyncio.sleep(0.3)
        await _post(r.search, "/v1/search", _json(new))  # notices the new version, loads it
        return first, await _post(r.search, "/v1/search", _json(new))

    (s1, before), (s2, after) = asyncio.run(run())
    assert s1 == s2 == 200 and before["catalogue_version"] == 1 and after["catalogue_version"] == 2
    assert "new-a" not in sum(before["ids"], [])
    assert [ids[0] for ids in after["ids"]] == ["new-a", "new-b", "new-c"]
