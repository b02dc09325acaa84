"""The prediction log in Redis (`serving.prediction_log: redis`): replicas across nodes.

Router replicas on different nodes cannot share a SQLite file, so they share a Redis (or
Valkey) server: `serving.redis_url`, keys under `serving.redis_prefix`. One server, a
primary with replicas or Sentinel; not Redis Cluster (a request's script also touches
the meta hash, another slot).

Keys (`P` is the prefix):

    P:req:{rid}    hash  t, prod, rows, lab (0/1), p:{gen} (prediction bytes), s:{gen} (sha256)
    P:c:{scope}    hash  counter name -> int (scope: a generation or base.FEEDBACK_SCOPE)
    P:scopes       set   the scopes written, so reads never need KEYS or SCAN
    P:meta         hash  epoch, logged, state (JSON), state_version
    P:replicas     hash  replica id -> JSON {"t": time, "doc": report}
    P:batch:{id}   string  a writer batch that committed (expires after BATCH_MARK_S)
    P:wanted       stream  requests flagged for labels (a candidate disagreed), `rid` each;
                           at most about base.WANTED_MAX entries (XADD MAXLEN ~)

Retention is Redis's own: by age, every request key expires `retention_s` after it was
written (rounded up to whole seconds; `judge` still calls older requests unknown); by
bytes, it is the server's `maxmemory`, the operator's setting, and `max_bytes` is only
reported. Use `maxmemory-policy volatile-ttl`: only keys with an expiry are evicted
(the requests, those nearest their expiry first, so the oldest), never the counters or
the shared state; an `allkeys-*` policy could evict those and is warned about. Nothing
is pruned here, so `pruned` stays 0.

Writes that must not overwrite, and the mark of a join, are Lua scripts (atomic on the
server); a batch of the writer thread is one MULTI/EXEC round trip (its scripts sent as
EVAL with their text, so that no NOSCRIPT can fail part of it) that also sets a marker
key `P:batch:{id}` (kept an hour), so a batch retried after its connection broke
mid-commit is skipped if it had landed, and never adds its counters twice. A batch one
of whose commands failed inside EXEC (the rest landed) is counted lost, not retried.
The feed cursor's `(id` ranges need Redis 6.2 or later.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis

from serving.predlog.base import (DUPLICATE_DETAIL, JOIN_FLUSH_S, MARKED, WANTED_MAX, BatchedLog, CommitLost,
                                  JoinOutcome, JoinResult, Stored, Tally, _Batch, decode_pred, join_increments, judge,
                                  split_counters)

log = logging.getLogger("graceful.predlog")

# KEYS: request, meta. ARGV: ttl, t, production, rows, then field, value pairs of the
# predictions. A request id already there is left as it is (a retried batch, or a
# replica that minted the same id).
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 't', ARGV[2], 'prod', ARGV[3], 'rows', ARGV[4], 'lab', '0', unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], 'logged', 1)
return 1
"""

# KEYS: request. ARGV: p:{gen}, prediction, s:{gen}, sha256. A request gone (expired,
# evicted, never written) stays gone: HSET on a missing key would create a key without
# an expiry.
_LATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
return 1
"""

# KEYS: request. ARGV: number of labels, now, retention_s. Returns {1 if this call
# marked it labelled, the request's fields as they were before}. The test is judge's
# for joined/partial, on the same numbers (Python's repr of a float reads back exactly
# in Lua), so the mark and the outcome agree; two replicas joining the same request at
# once see it marked once.
_JOIN = """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return {0, h} end
local f = {}
for i = 1, #h, 2 do f[h[i]] = h[i + 1] end
if f['lab'] ~= '1' and tonumber(f['rows']) == tonumber(ARGV[1])
    and tonumber(ARGV[2]) - tonumber(f['t']) <= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'lab', '1')
  return {1, h}
end
return {0, h}
"""

# KEYS: request, the wanted stream. ARGV: rid, max entries. Only a request still there is
# flagged (and added to the feed), once.
_WANT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[1], 'want', '1') == 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'rid', ARGV[1])
return 1
"""

# KEYS: meta. ARGV: the state document (JSON). The document and its version change together.
_STATE = """
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'state_version', 1)
"""

# How long a committed batch's marker is kept: far longer than any retry window.
BATCH_MARK_S = 3600


class LogStoreError(RuntimeError):
    """The Redis server cannot be used as a prediction log (the message says why, with
    the URL's password masked)."""


def mask_url(url: str) -> str:
    """`url` with its password (in the userinfo or a `password=` query) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis url>"
    netloc = parts.netloc
    if "@" in netloc:
        cred, host = netloc.rsplit("@", 1)
        if ":" in cred:
            cred = cred.split(":", 1)[0] + ":***"
        netloc = f"{cred}@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class RedisLog(BatchedLog):
    kind = "redis"

    def __init__(self, url: str, retention_s: float, max_bytes: int, prefix: str = "graceful", **kw: Any):
        super().__init__(retention_s, max_bytes, **kw)
        self.url = mask_url(url)
        self.prefix = prefix
        self._meta = f"{prefix}:meta"
        self._scopes = f"{prefix}:scopes"
        self._replicas = f"{prefix}:replicas"
        self._wanted = f"{prefix}:wanted"
        self._ttl = max(1, math.ceil(self.retention_s))
        try:
            self._r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        except ValueError as e:
            raise LogStoreError(f"redis log at {self.url}: not a Redis URL ({e})") from None
        self._scripts = {name: self._r.register_script(text)
                         for name, text in (("record", _RECORD), ("late", _LATE), ("join", _JOIN), ("state", _STATE),
                                            ("want", _WANT))}
        try:
            self._r.ping()
            self._load_scripts()
            # The first log ever opened on this server sets the epoch; it changes only
            # when Redis lost its data, which is what the controller's comparison is for.
            self._r.hsetnx(self._meta, "epoch", repr(time.time()))
            self.epoch = float(self._r.hget(self._meta, "epoch"))
            policy = self._r.info("memory").get("maxmemory_policy", "")
        except (redis.RedisError, OSError) as e:
            self._r.close()
            raise LogStoreError(f"redis log at {self.url}: Redis is unreachable or refused us "
                                f"({type(e).__name__}: {e})") from None
        if str(policy).startswith("allkeys-"):
            log.warning("prediction log (redis at %s): maxmemory-policy %s may evict the counters and the "
                        "routers' state; volatile-ttl evicts only expiring request keys", self.url, policy)
        self._start()

    def _req(self, rid: str) -> str:
        return f"{self.prefix}:req:{rid}"

    def _counter(self, scope: str) -> str:
        return f"{self.prefix}:c:{scope}"

    def _load_scripts(self) -> None:
        for s in self._scripts.values():
            self._r.script_load(s.script)

    def _eval(self, name: str, keys: Sequence[str], *args: Any) -> tuple:
        s = self._scripts[name]
        return ("EVALSHA", s.sha, len(keys), *keys, *args)

    def _eval_text(self, name: str, keys: Sequence[str], *args: Any) -> tuple:
        """EVAL with the script's text: in the writer's transactions, where a NOSCRIPT
        (a flushed or failed-over script cache) would let the rest of the batch, its
        marker included, land without the scripts' writes."""
        return ("EVAL", self._scripts[name].script, len(keys), *keys, *args)

    def _execute(self, cmds: list[tuple], transaction: bool) -> list:
        """The replies of `cmds`, sent in one round trip (MULTI/EXEC when `transaction`).

        A server that lost its script cache (restart, failover, SCRIPT FLUSH) answers
        NOSCRIPT to every EVALSHA of the round and runs the rest: the scripts are loaded
        and only the failed calls are sent again, so nothing runs twice. Any other error
        is raised (a queued error aborts a transaction whole, so its retry is safe)."""
        if not cmds:
            return []
        replies = self._send(cmds, transaction)
        redo = [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]
        if redo:
            self._load_scripts()
            # the same text loads under the same sha1, so the calls go again as they were
            again = self._send([cmds[i] for i in redo], transaction)
            for i, r in zip(redo, again):
                replies[i] = r
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return replies

    def _send(self, cmds: list[tuple], transaction: bool) -> list:
        pipe = self._r.pipeline(transaction=transaction)
        for c in cmds:
            pipe.execute_command(*c)
        return pipe.execute(raise_on_error=False)

    # --- writer thread -----------------------------------------------------------------
    def _write(self, batch: _Batch) -> None:
        mark = f"{self.prefix}:batch:{batch.id}"
        if batch.attempts > 1 and self._r.exists(mark):
            return  # the last try committed before its connection broke
        cmds: list[tuple] = [("SET", mark, 1, "EX", BATCH_MARK_S)]
        for rid, t, prod, rows, preds in batch.requests:
            fields: list[Any] = []
            for g, sha, blob in preds:
                fields += [f"p:{g}", blob, f"s:{g}", sha]
            cmds.append(self._eval_text("record", (self._req(rid), self._meta), self._ttl, repr(float(t)), prod,
                                   rows, *fields))
        for rid, g, sha, blob in batch.late:
            cmds.append(self._eval_text("late", (self._req(rid),), f"p:{g}", blob, f"s:{g}", sha))
        for rid in batch.wanted:
            cmds.append(self._eval_text("want", (self._req(rid), self._wanted), rid, WANTED_MAX))
        cmds += self._count_cmds(batch.tally)
        replies = self._send(cmds, transaction=True)
        errors = [r for r in replies if isinstance(r, Exception)]
        if errors:
            # EXEC ran the other commands (the marker too): a retry would skip the batch
            raise CommitLost(f"{len(errors)} of {len(cmds)} commands of the batch failed, the rest landed: "
                             f"{type(errors[0]).__name__}: {errors[0]}")

    def _count_cmds(self, tally: Tally) -> list[tuple]:
        cmds, scopes = [], set()
        for scope, name, value in tally.items():
            cmds.append(("HINCRBY", self._counter(scope), name, value))
            scopes.add(scope)
        if scopes:
            cmds.append(("SADD", self._scopes, *sorted(scopes)))
        return cmds

    def _prune(self, now: float) -> dict[str, int]:
        return {"age": 0, "bytes": 0}  # Redis expires and evicts the keys itself

    # --- joins -------------------------------------------------------------------------
    @staticmethod
    def _stored(flat: list) -> Optional[Stored]:
        if not flat:
            return None
        f = dict(zip(flat[::2], flat[1::2]))
        preds = {k[2:].decode(): decode_pred(v) for k, v in f.items() if k.startswith(b"p:")}
        return Stored(float(f[b"t"]), f[b"prod"].decode(), int(f[b"rows"]), f.get(b"lab") == b"1", preds)

    def join(self, items):
        # this replica's queued rows first: a label may follow its answer at once
        self.flush(JOIN_FLUSH_S)
        now = time.time()
        # One script per item, in order: a request id repeated in `items` finds the mark
        # of its first place and is a duplicate.
        replies = self._execute([self._eval("join", (self._req(rid),), len(labels), repr(now), repr(self.retention_s))
                                 for rid, labels in items], transaction=False)
        results, tally = [], Tally()
        for (rid, labels), (marked, flat) in zip(items, replies):
            outcome, added, detail = judge(self._stored(flat), labels, now, self.retention_s)
            if outcome in MARKED and not marked:
                # The script's mark is the one atomic decision: never count a request twice.
                outcome, added = JoinOutcome.DUPLICATE, {}
                detail = DUPLICATE_DETAIL
            tally.merge(join_increments(outcome, added))
            results.append(JoinResult(rid, outcome, added, detail))
        # The marks are in: a crash between the two round trips loses these counts, never doubles them.
        self._execute(self._count_cmds(tally), transaction=True)
        return results

    # --- reads and state -----------------------------------------------------------------
    def counters(self):
        pipe = self._r.pipeline(transaction=True)
        pipe.hsetnx(self._meta, "epoch", repr(time.time()))
        pipe.hget(self._meta, "epoch")
        pipe.smembers(self._scopes)
        _, epoch, members = pipe.execute()
        # A server that lost its data while this router ran starts a new epoch here, with
        # its counters back at 0: the controller sees the reset, not counters going back.
        self.epoch = float(epoch)
        scopes = sorted(s.decode() for s in members)
        pipe = self._r.pipeline(transaction=False)
        for s in scopes:
            pipe.hgetall(self._counter(s))
        rows = [(s, k.decode(), int(v)) for s, h in zip(scopes, pipe.execute()) for k, v in h.items()]
        return split_counters(rows)

    def wanted(self, after="", limit=1000):
        self.flush(JOIN_FLUSH_S)
        items, cursor = [], after
        # Stream entries of requests labelled or expired since are skipped: a few reads
        # of `limit` entries at most, so one call stays bounded.
        for _ in range(5):
            entries = self._r.xrange(self._wanted, min=f"({cursor}" if cursor else "-", count=limit)
            if not entries:
                break
            rids = [fields[b"rid"].decode() for _, fields in entries]
            pipe = self._r.pipeline(transaction=False)
            for rid in rids:
                pipe.hmget(self._req(rid), ["t", "rows", "lab"])
            for (sid, _), rid, (t, rows, lab) in zip(entries, rids, pipe.execute()):
                if len(items) >= limit:
                    return items, cursor
                cursor = sid.decode()
                if t is not None and lab != b"1":
                    items.append({"request_id": rid, "t": float(t), "rows": int(rows)})
            if len(items) >= limit or len(entries) < limit:
                break
        return items, cursor

    def describe(self) -> dict[str, Any]:
        logged = self._r.hget(self._meta, "logged")
        mem = self._r.info("memory")
        # "requests" counts requests written since the data began, not live keys: counting
        # those would take a SCAN over the whole keyspace.
        return {"kind": self.kind, "url": self.url, "requests": int(logged or 0), "bytes": int(mem["used_memory"]),
                "max_bytes": self.max_bytes, "maxmemory": int(mem.get("maxmemory", 0)),
                "maxmemory_policy": mem.get("maxmemory_policy"), "retention_s": self.retention_s, **self._health()}

    def read_state(self):
        doc, version = self._r.hmget(self._meta, ["state", "state_version"])
        return int(version or 0), None if doc is None else json.loads(doc)

    def write_state(self, doc):
        return int(self._scripts["state"](keys=[self._meta], args=[json.dumps(doc)]))

    def heartbeat(self, replica, doc):
        self._r.hset(self._replicas, replica, json.dumps({"t": time.time(), "doc": doc}))

    def replicas(self, max_age_s):
        now = time.time()
        out = {}
        for r, raw in self._r.hgetall(self._replicas).items():
            entry = json.loads(raw)
            if now - entry["t"] <= max_age_s:
                out[r.decode()] = entry["doc"]
        return out

    def close(self) -> None:
        super().close()
        try:
            self._r.close()
        except redis.RedisError:
            pass
