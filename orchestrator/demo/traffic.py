"""Simulated live traffic: predict requests over HTTP, with labels that arrive later.

Used by the demo and by integration tests to drive the router the way users would: each
request carries a few rows of held-out data; the true labels are posted to
`/v1/feedback` by request id after a delay, as they would arrive from downstream. With
`labels_wanted_only` a labelling job is simulated instead: it reads the router's
`/v1/labels/wanted` feed (the requests on which a candidate disagreed with production)
every `label_delay_s` and labels only those, through `/v1/feedback/batch`.
Request counts and time are bounded; only the given base URL is contacted.
"""

from __future__ import annotations

import heapq
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import requests

from serving.client import FEEDBACK_TOKEN_ENV


@dataclass
class TrafficStats:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    labelled: int = 0
    feedback_errors: int = 0
    wanted_seen: int = 0        # feed items read (labels_wanted_only)
    latencies_ms: list[float] = field(default_factory=list)
    by_generation: dict[str, int] = field(default_factory=dict)

    def p50_ms(self) -> float:
        return float(np.median(self.latencies_ms)) if self.latencies_ms else float("nan")


class TrafficGenerator:
    """Send `rows_per_request` rows per request from (x, y), `concurrency` at a time.

    Labels of a share `label_fraction` of requests are posted `label_delay_s` later.
    """

    def __init__(self, base_url: str, x: np.ndarray, y: np.ndarray, rows_per_request: int = 8,
                 concurrency: int = 4, label_delay_s: float = 0.5, label_fraction: float = 1.0,
                 users: int = 1000, seed: int = 0, timeout_s: float = 10.0, feedback_token: Optional[str] = None,
                 labels_wanted_only: bool = False, remember: int = 200_000):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError("x and y must be non-empty and of equal length")
        self.base_url = base_url.rstrip("/")
        self.x, self.y = np.asarray(x, dtype=np.float32), np.asarray(y)
        self.rows = rows_per_request
        self.concurrency = concurrency
        self.label_delay_s = label_delay_s
        self.label_fraction = label_fraction
        self.users = users
        self.timeout_s = timeout_s
        # The router's feedback token: given, else the client's default variable.
        feedback_token = feedback_token or os.environ.get(FEEDBACK_TOKEN_ENV)
        self._feedback_headers = {"Authorization": f"Bearer {feedback_token}"} if feedback_token else {}
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()
        self._pending: list[tuple[float, int, str, list[int]]] = []  # heap of due feedback
        self._pending_lock = threading.Lock()
        self._seq = 0
        self.labels_wanted_only = labels_wanted_only
        # The true labels of answered requests, for the feed's items (the newest `remember`).
        self._known: "OrderedDict[str, list[int]]" = OrderedDict()
        self._remember = remember
        self._cursor = ""
        self._next_poll = 0.0
        self._poll_lock = threading.Lock()
        self.stats = TrafficStats()
        self._stats_lock = threading.Lock()

    def _draw(self) -> tuple[list[list[float]], list[int], str, bool]:
        with self._rng_lock:
            idx = self._rng.integers(0, len(self.y), self.rows)
            user = f"user-{int(self._rng.integers(0, self.users))}"
            labelled = bool(self._rng.random() < self.label_fraction)
        return self.x[idx].tolist(), self.y[idx].tolist(), user, labelled

    def _one_request(self, session: requests.Session) -> None:
        rows, labels, user, labelled = self._draw()
        t0 = time.perf_counter()
        try:
            r = session.post(f"{self.base_url}/v1/predict", json={"inputs": rows, "user_id": user},
                             timeout=self.timeout_s)
            ok = r.status_code == 200
            body = r.json() if ok else {}
        except (requests.RequestException, ValueError):
            ok, body = False, {}
        ms = (time.perf_counter() - t0) * 1000
        with self._stats_lock:
            self.stats.sent += 1
            if ok:
                self.stats.ok += 1
                self.stats.latencies_ms.append(ms)
                gen = str(body.get("generation"))
                self.stats.by_generation[gen] = self.stats.by_generation.get(gen, 0) + 1
            else:
                self.stats.errors += 1
        if ok and labelled and body.get("request_id") and self.labels_wanted_only:
            with self._pending_lock:
                self._known[body["request_id"]] = labels
                while len(self._known) > self._remember:
                    self._known.popitem(last=False)
        elif ok and labelled and body.get("request_id"):
            with self._pending_lock:
                self._seq += 1
                heapq.heappush(self._pending, (time.monotonic() + self.label_delay_s, self._seq,
                                               body["request_id"], labels))

    def _label_wanted(self, session: requests.Session, flush: bool = False) -> None:
        """One labelling round: read the feed from the last cursor, post the labels of the
        requests it lists that this generator sent (one thread at a time, every label_delay_s)."""
        if not self._poll_lock.acquire(blocking=flush):
            return
        try:
            if not flush and time.monotonic() < self._next_poll:
                return
            self._next_poll = time.monotonic() + self.label_delay_s
            for _ in range(20):  # pages; bounded
                try:
                    r = session.get(f"{self.base_url}/v1/labels/wanted", params={"after": self._cursor, "limit": 500},
                                    headers=self._feedback_headers, timeout=self.timeout_s)
                    page = r.json() if r.status_code == 200 else None
                except (requests.RequestException, ValueError):
                    page = None
                if page is None:
                    with self._stats_lock:
                        self.stats.feedback_errors += 1
                    return
                with self._pending_lock:
                    items = [(i["request_id"], self._known[i["request_id"]]) for i in page.get("items", [])
                             if i.get("request_id") in self._known]
                if items:
                    try:
                        r = session.post(f"{self.base_url}/v1/feedback/batch",
                                         json={"items": [{"request_id": rid, "labels": y} for rid, y in items]},
                                         headers=self._feedback_headers, timeout=self.timeout_s)
                        ok = r.status_code == 200
                    except requests.RequestException:
                        ok = False
                    if not ok:  # the cursor stays: the same page is read again next round
                        with self._stats_lock:
                            self.stats.feedback_errors += 1
                        return
                    with self._stats_lock:
                        self.stats.labelled += len(items)
                with self._pending_lock:
                    for rid, _ in items:
                        self._known.pop(rid, None)
                with self._stats_lock:
                    self.stats.wanted_seen += len(page.get("items", []))
                self._cursor = page.get("next") or self._cursor
                if len(page.get("items", [])) < 500:
                    return
        finally:
            self._poll_lock.release()

    def _send_due_feedback(self, session: requests.Session, flush: bool = False) -> None:
        if self.labels_wanted_only:
            self._label_wanted(session, flush)
            return
        while True:
            with self._pending_lock:
                if not self._pending or (not flush and self._pending[0][0] > time.monotonic()):
                    return
                _, _, rid, labels = heapq.heappop(self._pending)
            try:
                r = session.post(f"{self.base_url}/v1/feedback", json={"request_id": rid, "labels": labels},
                                 headers=self._feedback_headers, timeout=self.timeout_s)
                ok = r.status_code == 200
            except requests.RequestException:
                ok = False
            with self._stats_lock:
                if ok:
                    self.stats.labelled += 1
                else:
                    self.stats.feedback_errors += 1

    def run(self, max_requests: int, max_seconds: float, stop: Optional[threading.Event] = None,
            rate_per_s: Optional[float] = None) -> TrafficStats:
        """Send up to `max_requests` for at most `max_seconds` (or until `stop` is set), then
        deliver the labels still pending and return the counts."""
        stop = stop or threading.Event()
        deadline = time.monotonic() + max_seconds
        budget = [max_requests]
        budget_lock = threading.Lock()
        interval = self.concurrency / rate_per_s if rate_per_s else 0.0

        def worker() -> None:
            with requests.Session() as session:
                while not stop.is_set() and time.monotonic() < deadline:
                    with budget_lock:
                        if budget[0] <= 0:
                            break
                        budget[0] -= 1
                    t0 = time.monotonic()
                    self._one_request(session)
                    self._send_due_feedback(session)
                    if interval:
                        time.sleep(max(0.0, interval - (time.monotonic() - t0)))

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()) + self.timeout_s + 1)
        # Labels arrive late by design; wait out the delay once so none is lost at the end.
        if (self._pending or self.labels_wanted_only) and not stop.is_set():
            time.sleep(min(self.label_delay_s, max(0.0, deadline - time.monotonic())))
        with requests.Session() as session:
            self._send_due_feedback(session, flush=True)
        return self.stats
