"""The router's online path in-process, over a real SQLite prediction log: minted request
ids, the feedback token, joins once, the batch route, two replicas sharing one log, and a
restart that loses nothing. No Ray or Serve: generations are hosted in the router
(`serving.in_router_models`), handlers get real Starlette requests. Over HTTP on real
Serve with two router replicas: tests/integration/test_online_path.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import torch

from serving.refs import ModelRef
from serving.specs import ServingSpec
from tests.redis_server import RedisServer
from tests.serving.test_router import _post, _request, _router_class
from workers.checkpoint import BUILTIN, load_model, save_model
from workers.models import build_model
from workers.specs import ArchSpec

SHAPE = (6,)
ADMIN, FEEDBACK = "admin-token-123", "feedback-token-456"
AUTH = {"Authorization": f"Bearer {FEEDBACK}"}


@pytest.fixture(scope="module")
def infos(tmp_path_factory):
    root = tmp_path_factory.mktemp("gens")
    out = {}
    for seed, name in enumerate(("g0", "g1")):
        torch.manual_seed(seed)
        m = build_model(ArchSpec(type="mlp", width=8, depth=1, embed_dim=4), SHAPE, 3).eval()
        sha = save_model(m, root / name)
        out[name] = {"app": None, "sha256": sha, "uri": str(root / name), "factory": BUILTIN}
    return out


def _router(infos, log_path, deployment_id="deployment-1", **kw):
    """One replica of the router application `deployment_id` (replicas of one application
    share the id serving.deploy.router_application mints)."""
    kw = {"prediction_log": "sqlite", "prediction_log_path": str(log_path), **kw}
    spec = ServingSpec(in_router_models=True, **kw).model_dump(mode="json")
    return _router_class()(spec, SHAPE, "g0", infos, {"g0": 1.0, "g1": 0.0}, ["g1"], None, ADMIN,
                           feedback_token=FEEDBACK, deployment_id=deployment_id)


def _x(n: int, seed: int = 0) -> bytes:
    x = np.random.default_rng(seed).standard_normal((n, *SHAPE)).round(3)
    return json.dumps({"inputs": x.tolist()}).encode()


async def _get(handler, path: str, query: str, headers: dict | None = None) -> tuple[int, dict]:
    req = _request(path, b"", headers=headers, query=query)
    req.scope["method"] = "GET"
    resp = await handler(req)
    return resp.status_code, json.loads(resp.body)


def _fb(rid: str, labels: list[int]) -> bytes:
    return json.dumps({"request_id": rid, "labels": labels}).encode()


async def _answered(r, n_requests: int, rows: int = 2, headers: dict | None = None) -> list[dict]:
    out = []
    for i in range(n_requests):
        status, body = await _post(r.predict, "/v1/predict", _x(rows, i), headers=headers)
        assert status == 200, body
        out.append(body)
    await asyncio.sleep(0.2)  # shadow copies: coalesced for 5 ms, then logged
    assert r.log.flush()
    return out


def test_feedback_needs_its_own_token_and_joins_each_request_once(infos, tmp_path):
    """401 without a bearer token, 403 with the admin token (it is not the feedback
    token), 200 joined with the right one; the same labels again are a duplicate (200,
    ignored: the counters do not move); an id never served is a 404, counted."""
    r = _router(infos, tmp_path / "log.sqlite")

    async def run():
        [ans] = await _answered(r, 1)
        rid, pred = ans["request_id"], ans["predictions"]
        no_token = await _post(r.feedback, "/v1/feedback", _fb(rid, pred))
        wrong = await _post(r.feedback, "/v1/feedback", _fb(rid, pred), headers={"Authorization": f"Bearer {ADMIN}"})
        first = await _post(r.feedback, "/v1/feedback", _fb(rid, pred), headers=AUTH)
        again = await _post(r.feedback, "/v1/feedback", _fb(rid, pred), headers=AUTH)
        unknown = await _post(r.feedback, "/v1/feedback", _fb("never-served", [0]), headers=AUTH)
        return no_token, wrong, first, again, unknown

    (s1, b1), (s2, b2), (s3, b3), (s4, b4), (s5, b5) = asyncio.run(run())
    assert (s1, s2) == (401, 403) and "feedback route" in b1["error"] and "token refused" in b2["error"]
    assert s3 == 200 and b3["outcome"] == "joined" and b3["candidates"]["g1"]["labelled"] == 2
    # labels equal to production's predictions: production is right on both rows
    assert b3["candidates"]["g1"]["production_correct"] == 2
    assert s4 == 200 and b4["outcome"] == "duplicate" and b4["joined"] is None and not b4["candidates"]
    assert s5 == 404 and "never served" in b5["error"]
    st = r.status()
    assert st["feedback"]["joined"] == 1 and st["feedback"]["duplicate"] == 1 and st["feedback"]["unknown"] == 1
    assert st["generations"]["g1"]["counters"]["labelled"] == 2  # the duplicate added nothing
    r.log.close()


def test_a_client_chosen_request_id_is_never_the_one_labels_join_by(infos, tmp_path):
    """A client sends X-Request-ID: chosen-by-client; the answer's request_id is the
    router's own, labels for the client's id are a 404, and two requests sending the same
    id get two ids, two log rows (neither overwrites the other)."""
    r = _router(infos, tmp_path / "log.sqlite")

    async def run():
        answers = await _answered(r, 2, headers={"X-Request-ID": "chosen-by-client"})
        steer = await _post(r.feedback, "/v1/feedback", _fb("chosen-by-client", [0, 0]), headers=AUTH)
        return answers, steer

    answers, (status, _) = asyncio.run(run())
    ids = {a["request_id"] for a in answers}
    assert "chosen-by-client" not in ids and len(ids) == 2 and status == 404
    assert r.log.describe()["requests"] == 2
    r.log.close()


def test_the_batch_route_checks_every_item_then_reports_each_outcome(infos, tmp_path):
    """Three answered requests: a batch with two of them, one twice, an unknown id and a
    wrong label count -> joined 2, duplicate 1, unknown 1, mismatched 1. A malformed item
    refuses the whole batch (400 naming it) and joins nothing."""
    r = _router(infos, tmp_path / "log.sqlite")

    async def run():
        a = await _answered(r, 3)
        bad = await _post(r.feedback_batch, "/v1/feedback/batch", json.dumps(
            {"items": [{"request_id": a[2]["request_id"], "labels": [0, 0]},
                       {"request_id": a[0]["request_id"], "labels": "x"}]}).encode(), headers=AUTH)
        items = [{"request_id": a[0]["request_id"], "labels": [0, 1]},
                 {"request_id": a[1]["request_id"], "labels": [2, 2]},
                 {"request_id": a[0]["request_id"], "labels": [0, 1]},
                 {"request_id": "nope", "labels": [1]},
                 {"request_id": a[2]["request_id"], "labels": [1]}]
        ok = await _post(r.feedback_batch, "/v1/feedback/batch", json.dumps({"items": items}).encode(), headers=AUTH)
        return bad, ok

    (s1, bad), (s2, ok) = asyncio.run(run())
    assert s1 == 400 and "items[1].labels" in bad["error"]
    assert s2 == 200 and ok["outcomes"] == {"joined": 2, "partial": 0, "duplicate": 1, "unknown": 1, "mismatched": 1}
    assert [x["outcome"] for x in ok["results"]] == ["joined", "joined", "duplicate", "unknown", "mismatched"]
    assert r.status()["generations"]["g1"]["counters"]["labelled"] == 4
    r.log.close()


def test_two_replicas_over_one_log_answer_join_and_count_as_one(infos, tmp_path):
    """Replica A answers; replica B joins A's labels; both report the same counters. A
    traffic change made on A reaches B at B's next state tick; one attached on B (a copy
    of g1) reaches A."""
    path = tmp_path / "log.sqlite"
    a, b = _router(infos, path), _router(infos, path)

    async def run():
        answers = await _answered(a, 4)
        joined = [await _post(b.feedback, "/v1/feedback", _fb(x["request_id"], x["predictions"]), headers=AUTH)
                  for x in answers]
        a.set_traffic({"g0": 0.5, "g1": 0.5}, shadows=[])
        await b._tick_state()
        g1 = infos["g1"]
        await b.attach_local(ModelRef("g1copy", g1["uri"], g1["sha256"], BUILTIN))
        await a._tick_state()
        return joined

    joined = asyncio.run(run())
    assert all(s == 200 and j["outcome"] == "joined" for s, j in joined)
    sa, sb = a.status(), b.status()
    assert sa["generations"]["g1"]["counters"] == sb["generations"]["g1"]["counters"]
    assert sa["generations"]["g1"]["counters"]["labelled"] == 8 and sa["feedback"]["joined"] == 4
    assert sb["weights"]["g1"] == 0.5 and sb["shadows"] == sa["shadows"] == ["g1copy"]
    assert "g1copy" in sa["weights"] and "g1copy" in a.gens and sa["state_version"] == sb["state_version"]
    for r in (a, b):
        r.log.close()


def test_a_restarted_router_continues_its_counters_and_joins_earlier_answers(infos, tmp_path):
    """Answer 3 requests, stop the router (its log closed as Serve would on shutdown), start
    another over the same file: labels for the earlier answers join, the counters go on from
    where they were (same counters_epoch), nothing is counted twice."""
    path = tmp_path / "log.sqlite"
    first = _router(infos, path)
    answers = asyncio.run(_answered(first, 3))
    before = first.status()
    first.log.close()
    second = _router(infos, path)

    async def run():
        return [await _post(second.feedback, "/v1/feedback", _fb(x["request_id"], x["predictions"]), headers=AUTH)
                for x in answers]

    joined = asyncio.run(run())
    after = second.status()
    assert all(s == 200 and j["outcome"] == "joined" for s, j in joined)
    assert after["counters_epoch"] == before["counters_epoch"] and after["started_at"] > before["started_at"]
    c0, c1 = before["generations"]["g1"]["counters"], after["generations"]["g1"]["counters"]
    assert c1["requests_shadow"] == c0["requests_shadow"] == 3 and c1["compared"] == c0["compared"] == 6
    assert c0["labelled"] == 0 and c1["labelled"] == 6
    second.log.close()


def test_a_new_deployment_over_an_old_log_starts_from_its_own_plan(infos, tmp_path):
    """The log keeps the traffic state of an earlier deployment (g1 at half the traffic);
    a router of a new deployment over the same file starts with the plan it was deployed
    with, and does not follow the old one's changes."""
    path = tmp_path / "log.sqlite"
    old = _router(infos, path, deployment_id="old")
    old.set_traffic({"g0": 0.5, "g1": 0.5}, shadows=[])
    new = _router(infos, path, deployment_id="new")
    old.set_traffic({"g0": 0.2, "g1": 0.8}, shadows=[])
    asyncio.run(new._tick_state())
    assert new.plan.weights == {"g0": 1.0, "g1": 0.0} and new.plan.shadows == ("g1",)
    for r in (old, new):
        r.log.close()


def test_through_a_redis_restart_answers_go_on_and_their_labels_join_after_it(infos, tmp_path):
    """Redis (persistence on) stops under the router: a prediction is still answered (its
    row waits in the writer's retries; the answer after LOG_WAIT_S), labels and status are
    503s naming the log and join nothing; once Redis is back that row lands and its labels
    join, with the counters of before the stop."""
    with RedisServer(persistence=True, directory=tmp_path / "redis") as server:
        r = _router(infos, None, prediction_log="redis", redis_url=server.url)

        async def run():
            [before] = await _answered(r, 1)
            server.stop()
            during = await _post(r.predict, "/v1/predict", _x(2, 7))
            label = await _post(r.feedback, "/v1/feedback", _fb(during[1]["request_id"], [0, 0]), headers=AUTH)
            status = await r.http_status()
            server.start()
            assert r.log.flush(30)
            after = [await _post(r.feedback, "/v1/feedback", _fb(x["request_id"], x["predictions"]), headers=AUTH)
                     for x in (before, during[1])]
            return during, label, status, after

        try:
            (s_during, _), (s_label, b_label), status, after = asyncio.run(run())
            assert s_during == 200 and r.health["log_waits_timed_out"] == 1
            assert s_label == 503 and "prediction log unavailable" in b_label["error"]
            assert status.status_code == 503 and "prediction log unavailable" in json.loads(status.body)["error"]
            assert [(s, b["outcome"]) for s, b in after] == [(200, "joined"), (200, "joined")]
            c = r.status()["generations"]["g1"]["counters"]
            assert c["requests_shadow"] == 2 and c["labelled"] == 4
            assert r.log.write_errors == 0 and r.log.dropped == 0
        finally:
            r.log.close()


def test_a_restarted_router_over_the_memory_log_starts_over_in_a_new_epoch(infos, tmp_path):
    """The memory log lives in the replica: after a restart the earlier answers are
    unknown (404) and the counters start from zero under a new counters_epoch, which the
    controller takes as a reset (never as counters going down)."""
    first = _router(infos, None, prediction_log="memory")
    [ans] = asyncio.run(_answered(first, 1))
    before = first.status()
    time.sleep(0.01)  # epochs are creation times
    second = _router(infos, None, prediction_log="memory")
    status, body = asyncio.run(_post(second.feedback, "/v1/feedback", _fb(ans["request_id"], ans["predictions"]),
                                     headers=AUTH))
    after = second.status()
    assert before["generations"]["g1"]["counters"]["requests_shadow"] == 1
    assert status == 404 and body["error"]
    assert after["counters_epoch"] != before["counters_epoch"]
    assert after["generations"].get("g1", {}).get("counters", {}).get("requests_shadow", 0) == 0


def test_the_labels_wanted_route_lists_the_disagreements_until_they_are_labelled(infos, tmp_path):
    """20 requests mirrored to g1: exactly the ones whose g1 prediction differs from the
    answer on some row are in the feed (the feedback token guards it; a bad cursor or
    limit is a 400), in order; a labelled one leaves it; replica B lists what A flagged."""
    path = tmp_path / "log.sqlite"
    a, b = _router(infos, path), _router(infos, path)

    async def run():
        answers = await _answered(a, 20, rows=3)
        no_token = await _get(b.labels_wanted, "/v1/labels/wanted", "")
        bad = [await _get(b.labels_wanted, "/v1/labels/wanted", q, headers=AUTH)
               for q in ("after=1;drop", "after=1", "after=abc.1-0", "limit=0", "limit=x")]
        feed = await _get(b.labels_wanted, "/v1/labels/wanted", "limit=100", headers=AUTH)
        first = feed[1]["items"][0]["request_id"] if feed[1]["items"] else None
        if first:
            x = next(ans for ans in answers if ans["request_id"] == first)
            await _post(a.feedback, "/v1/feedback", _fb(first, x["predictions"]), headers=AUTH)
        after = await _get(b.labels_wanted, "/v1/labels/wanted", "limit=100", headers=AUTH)
        # the cursor moves past what was read; one of another log starts from the oldest
        past = await _get(b.labels_wanted, "/v1/labels/wanted", f"after={feed[1]['next']}", headers=AUTH)
        other = await _get(b.labels_wanted, "/v1/labels/wanted", "after=abc.99999", headers=AUTH)
        return answers, no_token, bad, feed, after, past, other

    answers, no_token, bad, feed, after, past, other = asyncio.run(run())
    g1, _ = load_model(infos["g1"]["uri"], infos["g1"]["sha256"])
    want = []
    for i, ans in enumerate(answers):
        x = torch.tensor(json.loads(_x(3, i))["inputs"], dtype=torch.float32)
        with torch.no_grad():
            if (g1(x).argmax(1).numpy() != np.asarray(ans["predictions"])).any():
                want.append(ans["request_id"])
    assert no_token[0] == 401 and [s for s, _ in bad] == [400] * 5
    assert feed[0] == 200 and [i["request_id"] for i in feed[1]["items"]] == want and want
    assert [i["request_id"] for i in after[1]["items"]] == want[1:]
    assert past[1]["items"] == [] and past[1]["next"] == feed[1]["next"]
    assert [i["request_id"] for i in other[1]["items"]] == want[1:]
    for r in (a, b):
        r.log.close()
