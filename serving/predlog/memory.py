"""The prediction log in the router's own memory (`serving.prediction_log: memory`).

For tests and throwaway runs: one router replica only (the config refuses more), and a
restart loses it. Bounded by bytes (`serving.prediction_log_max_bytes`) and age: requests
go in in time order, so the oldest is always first and both limits pop from the front.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Optional

from serving.predlog.base import (MARKED, WANTED_MAX, JoinResult, PredictionLog, Stored, Tally, decode_pred,
                                  encode_pred, join_increments, judge, split_counters)

# What one logged request is counted to cost besides its prediction bytes and id: the
# entry's list, its dict, the dict's keys and the OrderedDict's node. An overestimate, so
# the cap binds before the real bytes reach it: tracemalloc on CPython 3.11 measured 618
# bytes for a request with two 4-row predictions, which these constants count as 904.
ENTRY_OVERHEAD = 600
PRED_OVERHEAD = 120


class MemoryLog(PredictionLog):
    kind = "memory"

    def __init__(self, retention_s: float, max_bytes: int, clock=time.time):
        super().__init__(retention_s, max_bytes)
        self._clock = clock
        self.epoch = clock()
        self._lock = threading.Lock()
        # rid -> [t, production, rows, labelled, {generation: (sha256, pred bytes)}, size, wanted]
        self._entries: "OrderedDict[str, list]" = OrderedDict()
        self._bytes = 0
        self._tally = Tally()
        self.pruned = {"age": 0, "bytes": 0}
        self._state: tuple[int, Optional[str]] = (0, None)
        self._replicas: dict[str, tuple[float, dict]] = {}
        self._wanted: "deque[tuple[int, str]]" = deque(maxlen=WANTED_MAX)   # (sequence number, rid)
        self._wanted_seq = 0

    def _drop_front(self, reason: str) -> None:
        _, entry = self._entries.popitem(last=False)
        self._bytes -= entry[5]
        self.pruned[reason] += 1

    def _prune(self, now: float) -> None:
        while self._entries and now - next(iter(self._entries.values()))[0] > self.retention_s:
            self._drop_front("age")
        while self._entries and self._bytes > self.max_bytes:
            self._drop_front("bytes")

    def record(self, rid, production, preds, t=None):
        now = self._clock() if t is None else t
        gens = {g: (sha, encode_pred(p)) for g, (sha, p) in preds.items()}
        size = ENTRY_OVERHEAD + len(rid) + sum(PRED_OVERHEAD + len(b) for _, b in gens.values())
        with self._lock:
            if rid not in self._entries:
                self._entries[rid] = [now, production, len(next(iter(preds.values()))[1]), False, gens, size, False]
                self._bytes += size
            self._prune(now)
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(True)
        return done

    def add_prediction(self, rid, generation, sha256, pred):
        blob = encode_pred(pred)
        with self._lock:
            entry = self._entries.get(rid)
            if entry is None or generation in entry[4]:
                return
            entry[4][generation] = (sha256, blob)
            entry[5] += PRED_OVERHEAD + len(blob)
            self._bytes += PRED_OVERHEAD + len(blob)
            self._prune(self._clock())

    def count(self, generation, **inc):
        with self._lock:
            self._tally.add(generation, **inc)

    def mark_wanted(self, rid):
        with self._lock:
            entry = self._entries.get(rid)
            if entry is not None and not entry[6]:
                entry[6] = True
                self._wanted_seq += 1
                self._wanted.append((self._wanted_seq, rid))

    def wanted(self, after="", limit=1000):
        start = int(after) if after else 0
        items, cursor = [], after
        with self._lock:
            for seq, rid in self._wanted:
                if seq <= start:
                    continue
                if len(items) >= limit:
                    break
                cursor = str(seq)
                entry = self._entries.get(rid)
                if entry is not None and not entry[3]:
                    items.append({"request_id": rid, "t": entry[0], "rows": entry[2]})
        return items, cursor

    def join(self, items):
        out = []
        now = self._clock()
        with self._lock:
            for rid, labels in items:
                entry = self._entries.get(rid)
                stored = None if entry is None else Stored(
                    entry[0], entry[1], entry[2], entry[3], {g: decode_pred(b) for g, (_, b) in entry[4].items()})
                outcome, added, detail = judge(stored, labels, now, self.retention_s)
                if outcome in MARKED:
                    entry[3] = True
                self._tally.merge(join_increments(outcome, added))
                out.append(JoinResult(rid, outcome, added, detail))
        return out

    def counters(self):
        with self._lock:
            return split_counters(list(self._tally.items()))

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"kind": self.kind, "requests": len(self._entries), "bytes": self._bytes,
                    "max_bytes": self.max_bytes, "retention_s": self.retention_s, "pruned": dict(self.pruned),
                    "pending": 0, "dropped": 0, "write_errors": 0}

    def read_state(self):
        with self._lock:
            version, doc = self._state
        return version, None if doc is None else json.loads(doc)

    def write_state(self, doc):
        with self._lock:
            version = self._state[0] + 1
            self._state = (version, json.dumps(doc))
        return version

    def heartbeat(self, replica, doc):
        with self._lock:
            self._replicas[replica] = (self._clock(), dict(doc))

    def replicas(self, max_age_s):
        now = self._clock()
        with self._lock:
            return {r: d for r, (t, d) in self._replicas.items() if now - t <= max_age_s}
