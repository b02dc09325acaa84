"""The traffic generator against a real (tiny) HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from orchestrator.demo.traffic import TrafficGenerator


class _Server:
    def __init__(self, fail_every: int = 0):
        self.predictions: dict[str, list] = {}
        self.feedback: dict[str, list] = {}
        self.order: list[str] = []
        self.calls = 0
        self.fail_every = fail_every
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls += 1
                if self.path == "/v1/predict":
                    if outer.fail_every and outer.calls % outer.fail_every == 0:
                        self.send_response(503)
                        self.end_headers()
                        return
                    rid = uuid.uuid4().hex
                    outer.predictions[rid] = body["inputs"]
                    outer.order.append(rid)
                    out = {"request_id": rid, "generation": "g0", "predictions": [0] * len(body["inputs"])}
                elif self.path == "/v1/feedback/batch":
                    for item in body["items"]:
                        outer.feedback[item["request_id"]] = item["labels"]
                    out = {"outcomes": {"joined": len(body["items"])}}
                else:
                    outer.feedback[body["request_id"]] = body["labels"]
                    out = {"ok": True}
                self._send(out)

            def do_GET(self):
                # /v1/labels/wanted: every even-numbered request is "wanted", after the cursor
                query = dict(p.split("=", 1) for p in self.path.partition("?")[2].split("&") if "=" in p)
                after = int(query.get("after") or 0)
                wanted = [(i + 1, rid) for i, rid in enumerate(list(outer.order)) if i % 2 == 0 and i + 1 > after]
                page = wanted[:int(query.get("limit", 1000))]
                self._send({"items": [{"request_id": rid, "t": 0.0, "rows": 3} for _, rid in page],
                            "next": str(page[-1][0]) if page else query.get("after", "")})

            def _send(self, out):
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def test_every_request_gets_its_own_labels_later(server):
    x = np.arange(40, dtype=np.float32).reshape(20, 2)  # row i is (2i, 2i+1): label = i
    y = np.arange(20)
    gen = TrafficGenerator(server.url, x, y, rows_per_request=3, concurrency=2, label_delay_s=0.05)
    stats = gen.run(max_requests=30, max_seconds=20)
    assert stats.sent == stats.ok == 30 and stats.errors == 0
    assert stats.labelled == 30 and len(server.feedback) == 30
    for rid, labels in server.feedback.items():
        rows = server.predictions[rid]
        assert labels == [int(r[0]) // 2 for r in rows]
    assert stats.by_generation == {"g0": 30}


def test_label_fraction_and_errors_are_counted():
    s = _Server(fail_every=4)
    try:
        gen = TrafficGenerator(s.url, np.zeros((5, 2)), np.zeros(5, int), concurrency=1,
                               label_delay_s=0.0, label_fraction=0.0)
        stats = gen.run(max_requests=20, max_seconds=20)
    finally:
        s.close()
    assert stats.sent == 20 and stats.errors > 0 and stats.ok + stats.errors == 20
    assert stats.labelled == 0 and not s.feedback


def test_time_bound_stops_it(server):
    gen = TrafficGenerator(server.url, np.zeros((5, 2)), np.zeros(5, int), concurrency=1)
    stats = gen.run(max_requests=10**9, max_seconds=0.5)
    assert 0 < stats.sent < 10**9


def test_labels_wanted_only_labels_exactly_the_requests_the_feed_lists(server):
    """The feed lists every other request: those, and only those, get their labels, through
    the batch route, each once (the cursor moves on)."""
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    gen = TrafficGenerator(server.url, x, np.arange(20), rows_per_request=3, concurrency=2, label_delay_s=0.05,
                           labels_wanted_only=True)
    stats = gen.run(max_requests=30, max_seconds=20)
    assert stats.ok == 30
    want = {rid for i, rid in enumerate(server.order) if i % 2 == 0}
    assert set(server.feedback) == want and stats.labelled == len(want) == 15
    for rid, labels in server.feedback.items():
        assert labels == [int(r[0]) // 2 for r in server.predictions[rid]]
