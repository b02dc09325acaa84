"""The Redis prediction log against a real redis-server: what only Redis does (scripts,
expiry, several replicas on one server, persistence across a server restart).

The contract every store meets is tests/serving/predlog/test_stores.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import redis

from serving.predlog.base import FEEDBACK_SCOPE, JoinOutcome
from serving.predlog.redis import LogStoreError, RedisLog, mask_url
from tests.helpers import free_port, wait_for
from tests.redis_server import RedisServer

DAY = 86400.0
MB = 1 << 20


def preds(prod=(1, 2), cand=(1, 0)) -> dict:
    """g0 (production) and g1 (candidate) predictions of a two-row request."""
    return {"g0": ("sha-g0", np.array(prod)), "g1": ("sha-g1", np.array(cand))}


@pytest.fixture
def open_logs(redis_url):
    """open_logs(**kw) -> a RedisLog on the test's server; all closed at the end."""
    logs = []

    def make(url: str = redis_url, retention_s: float = DAY, **kw) -> RedisLog:
        lg = RedisLog(url, retention_s, 64 * MB, **kw)
        logs.append(lg)
        return lg

    yield make
    for lg in logs:
        lg.close()


def raw(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def test_a_logged_request_joins_once_and_a_second_join_is_a_duplicate(open_logs):
    lg = open_logs()
    assert lg.record("r1", "g0", preds()).result(10) is True
    [first] = lg.join([("r1", [1, 2])])
    assert first.outcome is JoinOutcome.JOINED
    # By hand: production [1, 2] right twice, candidate [1, 0] loses row 2: one negative flip.
    f = first.candidates["g1"]
    assert (f.labelled, f.negative_flips, f.positive_flips) == (2, 1, 0)
    assert (f.production_correct, f.candidate_correct) == (2, 1)
    [second] = lg.join([("r1", [1, 2])])
    assert second.outcome is JoinOutcome.DUPLICATE and not second.candidates
    gens, feedback = lg.counters()
    assert gens["g1"]["labelled_requests"] == 1 and gens["g1"]["negative_flips"] == 1
    assert feedback["joined"] == 1 and feedback["duplicate"] == 1


def test_an_id_repeated_in_one_batch_is_a_duplicate_at_its_second_place(open_logs):
    lg = open_logs()
    lg.record("r1", "g0", preds())
    out = lg.join([("r1", [1, 2]), ("r1", [1, 2])])
    assert [r.outcome for r in out] == [JoinOutcome.JOINED, JoinOutcome.DUPLICATE]
    assert lg.counters()[0]["g1"]["labelled_requests"] == 1


def test_an_unknown_request_id_is_unknown_and_creates_no_key(open_logs, redis_url):
    lg = open_logs()
    [r] = lg.join([("never-served", [1])])
    assert r.outcome is JoinOutcome.UNKNOWN
    assert raw(redis_url).exists("graceful:req:never-served") == 0
    assert lg.counters()[1]["unknown"] == 1


def test_mismatched_labels_are_not_joined_and_the_right_count_joins_later(open_logs):
    lg = open_logs()
    lg.record("r1", "g0", preds())
    [bad] = lg.join([("r1", [1, 2, 0])])
    assert bad.outcome is JoinOutcome.MISMATCHED and "3 labels" in bad.detail
    # also when the mismatch and the right labels come in the same batch
    out = lg.join([("r1", [1]), ("r1", [1, 2])])
    assert [r.outcome for r in out] == [JoinOutcome.MISMATCHED, JoinOutcome.JOINED]
    assert lg.counters()[1]["mismatched"] == 2


def test_late_predictions_never_overwrite_and_never_create_a_request(open_logs, redis_url):
    lg = open_logs()
    lg.record("r1", "g0", {"g0": ("sha-g0", np.array([1, 2]))})
    lg.add_prediction("r1", "g1", "sha-g1", np.array([1, 0]))        # a shadow's answer, late
    lg.add_prediction("r1", "g1", "sha-other", np.array([9, 9]))     # never replaces it
    lg.add_prediction("r1", "g0", "sha-other", np.array([9, 9]))     # nor production's
    lg.add_prediction("gone", "g1", "sha-g1", np.array([1, 0]))      # expired or never logged
    assert lg.flush()
    r = raw(redis_url)
    assert r.exists("graceful:req:gone") == 0
    h = r.hgetall("graceful:req:r1")
    assert np.frombuffer(h[b"p:g1"], "<i4").tolist() == [1, 0] and h[b"s:g1"] == b"sha-g1"
    assert np.frombuffer(h[b"p:g0"], "<i4").tolist() == [1, 2] and h[b"s:g0"] == b"sha-g0"
    [j] = lg.join([("r1", [1, 2])])
    assert j.outcome is JoinOutcome.JOINED and j.candidates["g1"].negative_flips == 1


def test_a_request_logged_twice_keeps_its_first_predictions(open_logs):
    lg = open_logs()
    lg.record("r1", "g0", preds(cand=(1, 0)))
    lg.record("r1", "g0", preds(cand=(1, 2)))
    [j] = lg.join([("r1", [1, 2])])
    assert j.candidates["g1"].negative_flips == 1
    assert lg.describe()["requests"] == 1


def test_two_replicas_on_one_server_share_requests_and_counters(open_logs, redis_url):
    a, b = open_logs(), open_logs()
    a.record("r1", "g0", preds())
    a.count("g1", requests_shadow=3)
    b.count("g1", requests_shadow=2)
    assert a.flush() and b.flush()
    [j] = b.join([("r1", [1, 2])])      # labels reach the other replica
    assert j.outcome is JoinOutcome.JOINED
    assert a.counters() == b.counters()
    gens, feedback = a.counters()
    assert gens["g1"]["requests_shadow"] == 5 and gens["g1"]["labelled_requests"] == 1
    assert feedback["joined"] == 1
    assert raw(redis_url).hget(f"graceful:c:{FEEDBACK_SCOPE}", "joined") == b"1"  # one hash per scope
    [again] = a.join([("r1", [1, 2])])
    assert again.outcome is JoinOutcome.DUPLICATE


def test_state_versions_increase_across_replicas_and_heartbeats_are_shared(open_logs):
    a, b = open_logs(), open_logs()
    assert a.read_state() == (0, None)
    assert a.write_state({"plan": 1}) == 1
    assert b.write_state({"plan": 2}) == 2
    assert a.read_state() == (2, {"plan": 2})
    a.heartbeat("replica-a", {"inflight": 1})
    b.heartbeat("replica-b", {"inflight": 2})
    assert b.replicas(60) == {"replica-a": {"inflight": 1}, "replica-b": {"inflight": 2}}
    assert a.replicas(-1) == {}


def test_request_keys_expire_after_the_retention(open_logs, redis_url):
    lg = open_logs(retention_s=1)
    lg.record("r1", "g0", preds()).result(10)
    r = raw(redis_url)
    assert r.ttl("graceful:req:r1") != -1         # an expiry (or already expired: -2)
    assert r.ttl("graceful:meta") == -1           # the log's own keys never expire
    assert open_logs(retention_s=2.5)._ttl == 3 and open_logs(retention_s=0.2)._ttl == 1  # whole seconds, up
    wait_for(lambda: r.exists("graceful:req:r1") == 0, timeout_s=10)
    [j] = lg.join([("r1", [1, 2])])
    assert j.outcome is JoinOutcome.UNKNOWN


def test_the_epoch_survives_reopening_the_log(open_logs):
    first = open_logs()
    first.close()
    assert open_logs().epoch == first.epoch


def test_prefixes_keep_two_logs_apart_on_one_server(open_logs):
    a, b = open_logs(prefix="blue"), open_logs(prefix="green")
    a.record("r1", "g0", preds())
    assert a.flush()
    assert b.join([("r1", [1, 2])])[0].outcome is JoinOutcome.UNKNOWN
    assert a.join([("r1", [1, 2])])[0].outcome is JoinOutcome.JOINED
    assert b.counters()[0] == {}


def test_a_flushed_script_cache_is_reloaded_without_counting_twice(open_logs, redis_url):
    lg = open_logs()
    raw(redis_url).script_flush()
    lg.record("r1", "g0", preds())
    lg.count("g1", requests_shadow=1)
    assert lg.flush()
    raw(redis_url).script_flush()
    assert lg.join([("r1", [1, 2])])[0].outcome is JoinOutcome.JOINED
    gens, feedback = lg.counters()
    assert gens["g1"]["requests_shadow"] == 1 and gens["g1"]["labelled_requests"] == 1 and feedback["joined"] == 1
    assert lg.describe()["write_errors"] == 0


def test_describe_reports_redis_memory_and_writes(open_logs):
    lg = open_logs()
    for i in range(3):
        lg.record(f"r{i}", "g0", preds())
    assert lg.flush()
    d = lg.describe()
    assert d["kind"] == "redis" and d["url"] == lg.url and d["requests"] == 3
    assert d["bytes"] > 0 and d["max_bytes"] == 64 * MB and d["pruned"] == {"age": 0, "bytes": 0}


def test_with_persistence_a_server_restart_keeps_requests_counters_and_epoch(tmp_path):
    with RedisServer(persistence=True, directory=tmp_path / "redis") as server:
        lg = RedisLog(server.url, DAY, 64 * MB)
        try:
            lg.record("r1", "g0", preds()).result(10)
            lg.record("r2", "g0", preds()).result(10)
            lg.count("g1", requests_shadow=2)
            assert lg.join([("r2", [1, 2])])[0].outcome is JoinOutcome.JOINED
            epoch, before = lg.epoch, lg.counters()
            server.stop()
            server.start()
            # A router that lived through the restart goes on (its client reconnects)...
            assert lg.join([("r1", [1, 2])])[0].outcome is JoinOutcome.JOINED
        finally:
            lg.close()
        # ...and one started after it continues the same log.
        again = RedisLog(server.url, DAY, 64 * MB)
        try:
            assert again.epoch == epoch
            gens, feedback = again.counters()
            assert gens["g1"]["requests_shadow"] == before[0]["g1"]["requests_shadow"] == 2
            assert gens["g1"]["labelled_requests"] == 2 and feedback["joined"] == 2
            assert again.join([("r2", [1, 2])])[0].outcome is JoinOutcome.DUPLICATE
        finally:
            again.close()


def test_with_persistence_an_acknowledged_record_survives_a_server_kill(tmp_path):
    with RedisServer(persistence=True, directory=tmp_path / "redis") as server:
        lg = RedisLog(server.url, DAY, 64 * MB)
        try:
            assert lg.record("r1", "g0", preds()).result(10) is True   # appendfsync always: on disk
            server.kill()
            server.start()
            assert lg.join([("r1", [1, 2])])[0].outcome is JoinOutcome.JOINED
        finally:
            lg.close()


def test_records_written_while_the_server_is_down_land_once_it_is_back(tmp_path):
    with RedisServer(persistence=True, directory=tmp_path / "redis") as server:
        lg = RedisLog(server.url, DAY, 64 * MB, retry_s=30.0)
        try:
            lg.record("r1", "g0", preds()).result(10)
            server.stop()
            # Queued and retried by the writer thread while nothing answers.
            pending = [lg.record(f"down{i}", "g0", preds()) for i in range(5)]
            lg.count("g1", requests_shadow=5)
            wait_for(lambda: lg.retried > 0, timeout_s=10)
            server.start()
            assert all(f.result(30) is True for f in pending)
            assert lg.write_errors == 0 and lg.dropped == 0
            results = lg.join([(f"down{i}", [1, 2]) for i in range(5)])
            assert {r.outcome for r in results} == {JoinOutcome.JOINED}
            assert lg.counters()[0]["g1"]["requests_shadow"] == 5
        finally:
            lg.close()


def test_a_batch_retried_after_its_commit_landed_is_not_written_twice(open_logs):
    lg = open_logs()
    send = lg._send
    broken = {"once": True}

    def commit_then_lose_the_reply(cmds, transaction):
        replies = send(cmds, transaction)
        if transaction and broken.pop("once", False):
            raise redis.ConnectionError("connection lost after EXEC")  # as a dropped socket would
        return replies

    lg._send = commit_then_lose_the_reply
    lg.count("g1", requests_shadow=3)
    assert lg.record("r1", "g0", preds()).result(10) is True
    assert lg.retried == 1 and lg.write_errors == 0
    gens, _ = lg.counters()
    assert gens["g1"]["requests_shadow"] == 3      # once, not 6
    assert lg.describe()["requests"] == 1


def test_a_batch_whose_command_fails_inside_exec_is_counted_lost_not_retried(open_logs, redis_url):
    """A counter key of the wrong type makes its HINCRBY fail inside EXEC while the rest of
    the transaction (the batch marker too) lands: a retry would find the marker and call
    the batch written, so it is counted lost at once."""
    lg = open_logs()
    raw(redis_url).set("graceful:c:g1", "not a hash")
    lg.count("g1", requests_shadow=1)
    assert lg.record("r1", "g0", preds()).result(10) is False
    assert lg.write_errors == 1 and lg.retried == 0 and "WRONGTYPE" in lg.last_error


def test_a_store_down_for_longer_than_the_retry_window_drops_the_batch_and_counts_it(redis_server):
    lg = RedisLog(redis_server.url, DAY, 64 * MB, retry_s=0.5)
    try:
        redis_server.kill()
        assert lg.record("r1", "g0", preds()).result(30) is False
        assert lg.write_errors == 1 and lg.dropped == 1 and "Connection" in lg.last_error
    finally:
        lg.close()


def test_without_persistence_a_restart_loses_the_data_and_every_log_reads_a_new_epoch(redis_server):
    lg = RedisLog(redis_server.url, DAY, 64 * MB)
    try:
        lg.record("r1", "g0", preds()).result(10)
        redis_server.restart()
        after = RedisLog(redis_server.url, DAY, 64 * MB)
        try:
            old_epoch = lg.epoch
            assert after.epoch != old_epoch
            assert after.join([("r1", [1, 2])])[0].outcome is JoinOutcome.UNKNOWN
            lg.counters()        # the log that lived through the loss reads the new epoch
            assert lg.epoch == after.epoch
        finally:
            after.close()
    finally:
        lg.close()


def test_an_unreachable_server_raises_log_store_error_naming_the_masked_url():
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    with pytest.raises(LogStoreError) as e:
        RedisLog(url, DAY, 64 * MB)
    msg = str(e.value)
    assert f"redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in msg and "s3cret" not in msg


def test_mask_url_hides_passwords_in_userinfo_and_query():
    assert mask_url("redis://user:pw@host:6379/1") == "redis://user:***@host:6379/1"
    assert mask_url("rediss://:pw@host/0") == "rediss://:***@host/0"
    assert mask_url("redis://host:6379/0?password=pw&db=1") == "redis://host:6379/0?password=***&db=1"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"
