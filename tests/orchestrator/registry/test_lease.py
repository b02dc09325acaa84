"""The controller lease and the ever-production history, on a real SQLite registry and a
real PostgreSQL one (the `location` fixture)."""

from __future__ import annotations

import pytest

from orchestrator.registry import LeaseHeld, LeaseLost, Registry, RegistryError

SHA = "a" * 64


@pytest.fixture
def reg(location):
    r = Registry(location, password_env="GRACEFUL_REGISTRY_PASSWORD")
    r.add_generation("g0", None, "mlp", "h", "/x/g0", SHA)
    r.add_generation("g1", "g0", "mlp", "h", "/x/g1", "b" * 64)
    r.bootstrap_production("g0", "test")
    yield r
    r.close()


def test_one_holder_at_a_time_until_the_lease_expires(reg):
    """ttl 10 s from t=100: b is refused at t=105 (naming a), granted at t=111 (a expired),
    after which a's renewal fails."""
    rid = reg.start_rollout("g1", "g0", "test", "go").id
    lease = reg.acquire_lease(rid, "a", 10, now=100)
    assert (lease.holder, lease.expires_at) == ("a", 110)
    with pytest.raises(LeaseHeld, match="driven by controller 'a'"):
        reg.acquire_lease(rid, "b", 10, now=105)
    assert reg.acquire_lease(rid, "a", 10, now=105).expires_at == 115      # the holder renews
    with pytest.raises(LeaseHeld):
        reg.acquire_lease(rid, "b", 10, now=114)
    assert reg.acquire_lease(rid, "b", 10, now=116).holder == "b"
    # fencing: a late move by the old holder is refused inside the transition
    with pytest.raises(LeaseLost, match="'b' does"):
        reg.transition(rid, ("shadow", 0), state="canary", step=1, weight=0.1, actor="controller",
                       action="advance", reason="late", holder="a", now=117)
    assert reg.rollout(rid).state == "shadow"
    moved = reg.transition(rid, ("shadow", 0), state="canary", step=1, weight=0.1, actor="controller",
                           action="advance", reason="on time", holder="b", now=117)
    assert moved.state == "canary"
    actions = [(e.action, e.data.get("previous_holder")) for e in reg.events("g1") if e.action.startswith("lease")]
    assert actions == [("lease_acquired", None), ("lease_taken_over", "a")]


def test_a_released_lease_is_free_at_once(reg):
    rid = reg.start_rollout("g1", "g0", "test", "go").id
    reg.acquire_lease(rid, "a", 60, now=0)
    assert reg.release_lease(rid, "b") is False and reg.release_lease(rid, "a") is True
    assert reg.lease(rid) is None and reg.acquire_lease(rid, "b", 60, now=1).holder == "b"


def test_ever_production_lists_every_production_most_recent_last(reg):
    r = reg.start_rollout("g1", "g0", "test", "go")
    reg.transition(r.id, ("shadow", 0), state="promoted", step=1, weight=1.0, actor="t", action="promote", reason="t")
    assert reg.ever_production() == ["g0", "g1"] and reg.production().name == "g1"
    assert reg.generation("g0").status == "retired"


def test_a_readonly_registry_reads_and_refuses_to_write(reg):
    ro = Registry(reg.location, readonly=True, password_env="GRACEFUL_REGISTRY_PASSWORD")
    try:
        assert ro.production().name == "g0" and ro.ever_production() == ["g0"]
        with pytest.raises(RegistryError, match="opened read-only"):
            ro.audit("x", "y", "g0")
    finally:
        ro.close()


def test_a_generation_retrained_since_it_was_production_is_not_an_ancestor(reg):
    """g0 was production, then g1; g0 retired is retrained (new bytes): its new bytes were
    never production, so only g1 remains."""
    r = reg.start_rollout("g1", "g0", "test", "go")
    reg.transition(r.id, ("shadow", 0), state="promoted", step=1, weight=1.0, actor="t", action="promote", reason="t")
    reg.add_generation("g0", None, "mlp", "h", "/x/g0", "c" * 64, replace=True)
    assert reg.ever_production() == ["g1"]
