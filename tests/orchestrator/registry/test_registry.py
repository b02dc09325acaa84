"""The registry on real SQLite files and a real PostgreSQL server (the `reg` and
`location` fixtures run each test on both): lineage, statuses, rollouts with
compare-and-set, commands, the append-only audit log, migration of an old file, tamper
detection, and two real processes writing at once."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from orchestrator.registry import (SCHEMA_VERSION, IntegrityError, Registry, RegistryError, StaleTransition,
                                   registry_path)

SHA = {k: c * 64 for k, c in zip(("g0", "g1", "g2", "g3"), "abcd")}


PASSWORD_ENV = "GRACEFUL_REGISTRY_PASSWORD"


def _raw(reg, sql):
    """SQL around the API, as any other client of the database could send it."""
    reg._backend.write(lambda tx: tx.execute(sql))


def _chain(reg, names=("g0", "g1", "g2")):
    parent = None
    for n in names:
        reg.add_generation(n, parent, "mlp", "cfg", f"/ckpt/{n}/model.pt", SHA[n], {"test_accuracy": 0.9})
        parent = n


def test_sqlite_file_settings(tmp_path):
    reg = Registry(tmp_path / "registry.sqlite")
    db = sqlite3.connect(tmp_path / "registry.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert reg.schema_version() == SCHEMA_VERSION
    assert reg._backend._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert reg._backend._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a commit survives power loss
    reg.close()


def test_registry_path_is_in_the_run_dir(tmp_path):
    class Cfg:
        run_dir = tmp_path / "run"
    assert registry_path(Cfg()) == tmp_path / "run" / "registry.sqlite"


def test_generations_lineage_and_idempotence(reg):
    _chain(reg)
    assert [g.name for g in reg.generations()] == ["g0", "g1", "g2"]
    assert [g.name for g in reg.lineage("g2")] == ["g0", "g1", "g2"]
    assert [g.name for g in reg.lineage("g0")] == ["g0"]
    g1 = reg.generation("g1")
    assert (g1.parent, g1.status, g1.metrics) == ("g0", "trained", {"test_accuracy": 0.9})
    # same sha256: the same record back, no new event
    n_events = len(reg.events())
    assert reg.add_generation("g1", "g0", "mlp", "cfg", "/elsewhere", SHA["g1"]) == g1
    assert len(reg.events()) == n_events
    with pytest.raises(RegistryError, match=f"registered with sha256 {SHA['g1']}, not {SHA['g3']}"):
        reg.add_generation("g1", "g0", "mlp", "cfg", "/x", SHA["g3"])
    new = reg.add_generation("g1", "g0", "mlp", "cfg2", "/x", SHA["g3"], replace=True)
    assert (new.sha256, new.config_hash, new.created_at) == (SHA["g3"], "cfg2", g1.created_at)
    assert reg.events("g1")[-1].action == "replaced"
    assert reg.generation("nope") is None
    with pytest.raises(RegistryError, match="unknown generation 'nope'"):
        reg.lineage("nope")


def test_bad_generations_are_refused_and_nothing_is_stored(reg):
    with pytest.raises(RegistryError, match="parent 'g9' of 'g1' is not registered"):
        reg.add_generation("g1", "g9", "mlp", "cfg", "/x", SHA["g1"])
    with pytest.raises(RegistryError, match="64 lowercase hex"):
        reg.add_generation("g1", None, "mlp", "cfg", "/x", "abc")
    assert reg.generations() == [] and reg.events() == []


def test_status_changes_are_audited_and_production_is_unique(reg):
    _chain(reg)
    assert reg.production() is None
    reg.set_status("g0", "production", "train", "bootstrap: first generation")
    assert reg.production().name == "g0"
    reg.set_status("g1", "production", "alice", "manual")
    assert reg.production().name == "g1"
    assert reg.generation("g0").status == "retired"
    ev = [(e.subject, e.from_state, e.to_state, e.actor) for e in reg.events() if e.action == "status"]
    assert ev == [("g0", "trained", "production", "train"), ("g0", "production", "retired", "alice"),
                  ("g1", "trained", "production", "alice")]
    with pytest.raises(RegistryError, match="status 'bogus' is not one of"):
        reg.set_status("g1", "bogus", "a", "b")
    with pytest.raises(RegistryError, match="unknown generation 'g7'"):
        reg.set_status("g7", "rejected", "a", "b")


def test_rollout_lifecycle_moves_generation_statuses(reg):
    _chain(reg)
    reg.set_status("g0", "production", "train", "bootstrap")
    r = reg.start_rollout("g1", "g0", "ctl", "offline gate passed", data={"x": 1})
    assert (r.state, r.step, r.weight, r.data) == ("shadow", 0, 0.0, {"x": 1})
    assert reg.generation("g1").status == "shadow"
    assert reg.active_rollout() == r
    with pytest.raises(RegistryError, match="still active"):
        reg.start_rollout("g2", "g0", "ctl", "second")
    r = reg.transition(r.id, ("shadow", 0), state="canary", step=0, weight=0.05, actor="ctl",
                       action="advance", reason="shadow baked")
    assert reg.generation("g1").status == "canary"
    started = r.step_started_at
    p = reg.transition(r.id, ("canary", 0), state="paused", step=0, weight=0.05, actor="bob",
                       action="pause", reason="looking")
    assert (p.paused_from, p.step_started_at) == ("canary", started)  # a pause keeps the step's clock
    q = reg.transition(r.id, ("paused", 0), state="canary", step=1, weight=0.25, actor="ctl",
                       action="resume", reason="ok", data={"n": 5}, step_started_at=123.0)
    assert (q.paused_from, q.step_started_at, q.data) == (None, 123.0, {"n": 5})
    done = reg.transition(r.id, ("canary", 1), state="promoted", step=1, weight=1.0, actor="ctl",
                          action="promote", reason="nfr bound below limit")
    assert done.finished_at is not None and reg.active_rollout() is None
    assert (reg.generation("g1").status, reg.generation("g0").status) == ("production", "retired")
    assert reg.latest_rollout("g1") == done and reg.rollout(done.id) == done
    with pytest.raises(RegistryError, match="is finished"):
        reg.transition(r.id, ("promoted", 1), state="rolled_back", step=1, weight=0, actor="a", action="x", reason="")
    # the next rollout may start now; a rollback marks the candidate
    r2 = reg.start_rollout("g2", "g1", "ctl", "next")
    reg.transition(r2.id, ("shadow", 0), state="rolled_back", step=0, weight=0.0, actor="ctl",
                   action="rollback", reason="nfr too high")
    assert reg.generation("g2").status == "rolled_back"
    assert reg.production().name == "g1"
    actions = [e.action for e in reg.events("g1")]
    assert actions[:2] == ["registered", "rollout_started"] and "promote" in actions


def test_stale_transition_changes_nothing(reg):
    _chain(reg)
    r = reg.start_rollout("g1", "g0", "ctl", "go")
    reg.transition(r.id, ("shadow", 0), state="canary", step=0, weight=0.1, actor="ctl", action="advance", reason="")
    n_events = len(reg.events())
    with pytest.raises(StaleTransition, match=r"at \(canary, step 0\), not the expected \(shadow, step 0\)"):
        reg.transition(r.id, ("shadow", 0), state="rolled_back", step=0, weight=0.0, actor="op",
                       action="rollback", reason="late")
    assert reg.rollout(r.id).state == "canary" and reg.generation("g1").status == "canary"
    assert len(reg.events()) == n_events
    assert issubclass(StaleTransition, RegistryError)
    with pytest.raises(RegistryError, match="unknown rollout 99"):
        reg.transition(99, ("shadow", 0), state="canary", step=0, weight=0.1, actor="a", action="b", reason="")
    with pytest.raises(RegistryError, match="weight must be within"):
        reg.transition(r.id, ("canary", 0), state="canary", step=0, weight=1.5, actor="a", action="b", reason="")


def test_commands_queue(reg):
    _chain(reg)
    r = reg.start_rollout("g1", "g0", "ctl", "go")
    c1 = reg.enqueue_command(r.id, "pause", "alice", "investigating")
    c2 = reg.enqueue_command(r.id, "rollback", "bob", "bad flips", force=True)
    assert [c.id for c in reg.pending_commands(r.id)] == [c1.id, c2.id]
    assert reg.pending_commands(r.id)[1].force is True
    reg.complete_command(c1.id, "paused")
    assert [c.id for c in reg.pending_commands(r.id)] == [c2.id]
    with pytest.raises(RegistryError, match="already done"):
        reg.complete_command(c1.id, "again")
    with pytest.raises(RegistryError, match="command 'reboot' is not one of"):
        reg.enqueue_command(r.id, "reboot", "eve", "")
    with pytest.raises(RegistryError, match="unknown rollout"):
        reg.enqueue_command(42, "pause", "eve", "")
    req = [e for e in reg.events("g1") if e.action == "requested"]
    assert [(e.actor, e.data["command"]) for e in req] == [("alice", "pause"), ("bob", "rollback")]


def test_evaluations_recorded(reg):
    _chain(reg)
    eid = reg.record_evaluation("g1", "g0", {"nfr": 0.01}, True, [])
    reg.record_evaluation("g2", "g1", {"nfr": 0.2}, False, ["nfr 0.2 > 0.02"])
    assert reg.evaluations("g1")[0]["id"] == eid
    assert [(e["candidate"], e["passed"], e["reasons"]) for e in reg.evaluations()] == [
        ("g1", True, []), ("g2", False, ["nfr 0.2 > 0.02"])]
    assert reg.events("g2")[-1].reason == "failed: nfr 0.2 > 0.02"
    with pytest.raises(RegistryError, match="unknown generation 'gx'"):
        reg.record_evaluation("gx", None, {}, True, [])


def test_audit_log_is_append_only(reg):
    e = reg.audit("alice", "note", "g0", "hello", data={"k": 1})
    assert reg.events() == [e]
    for sql in ("UPDATE events SET reason = 'edited'", "DELETE FROM events"):
        with pytest.raises(Exception, match="append-only"):
            _raw(reg, sql)
    assert reg.events()[0].reason == "hello"
    for k in range(5):
        reg.audit("a", "n", "s", str(k))
    assert [x.reason for x in reg.events(limit=2)] == ["3", "4"]
    assert [x.reason for x in reg.events(subject="g0")] == ["hello"]


# --- migration -------------------------------------------------------------------------------

# The schema of version 1, as files written by that version have it (kept verbatim here
# rather than imported: the test is of a file on disk, not of the code's copy).
V1_SQL = """
CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL);
INSERT INTO schema_version VALUES (1, 1700000000.0);
CREATE TABLE generations (name TEXT PRIMARY KEY, parent TEXT REFERENCES generations(name),
    arch TEXT NOT NULL, config_hash TEXT NOT NULL, checkpoint_uri TEXT NOT NULL, sha256 TEXT NOT NULL,
    created_at REAL NOT NULL, status TEXT NOT NULL);
CREATE TABLE evaluations (id INTEGER PRIMARY KEY AUTOINCREMENT, candidate TEXT NOT NULL REFERENCES generations(name),
    baseline TEXT REFERENCES generations(name), metrics TEXT NOT NULL, passed INTEGER NOT NULL,
    reasons TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, subject TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', from_state TEXT, to_state TEXT);
INSERT INTO generations VALUES ('g0', NULL, 'mlp', 'h0', '/c/g0', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 1700000001.0, 'production');
INSERT INTO generations VALUES ('g1', 'g0', 'cnn', 'h1', '/c/g1', 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb', 1700000002.0, 'trained');
INSERT INTO evaluations VALUES (1, 'g1', 'g0', '{"nfr": 0.01}', 1, '[]', 1700000003.0);
INSERT INTO events VALUES (1, 1700000001.5, 'train', 'status', 'g0', 'bootstrap', 'trained', 'production');
"""


def test_migration_from_v1_keeps_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(V1_SQL)
    db.close()
    reg = Registry(path)
    assert reg.schema_version() == SCHEMA_VERSION == 4
    gens = reg.generations()
    assert [(g.name, g.parent, g.arch, g.status, g.metrics) for g in gens] == [
        ("g0", None, "mlp", "production", {}), ("g1", "g0", "cnn", "trained", {})]
    assert reg.evaluations() == [{"id": 1, "candidate": "g1", "baseline": "g0", "metrics": {"nfr": 0.01},
                                  "passed": True, "reasons": [], "created_at": 1700000003.0}]
    old = reg.events()[0]
    assert (old.id, old.reason, old.data) == (1, "bootstrap", {})
    # what version 2 added works on the migrated file
    r = reg.start_rollout("g1", "g0", "ctl", "after migration")
    assert reg.active_rollout() == r
    # what version 4 added: the frozen state and the freeze command, still one active rollout
    r = reg.transition(r.id, ("shadow", 0), state="frozen", step=0, weight=0.0, actor="alice", action="freeze",
                       reason="look first")
    assert (r.state, r.paused_from) == ("frozen", "shadow") and reg.active_rollout() == r
    reg.enqueue_command(r.id, "freeze", "alice", "again")
    with pytest.raises(sqlite3.IntegrityError, match="one_active_rollout|UNIQUE"):
        reg._backend._db.execute("INSERT INTO rollouts (candidate, baseline, state, step, weight, step_started_at, "
                        "started_at, updated_at) VALUES ('g1', 'g0', 'guarding', 1, 1.0, 0, 0, 0)")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        reg._backend._db.execute("INSERT INTO commands (rollout_id, command, actor, reason, created_at) "
                        "VALUES (1, 'explode', 'x', 'y', 0)")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        sqlite3.connect(path, isolation_level=None).execute("DELETE FROM events")
    reg.close()
    # reopening does not migrate twice
    again = Registry(path)
    versions = again._backend._db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [v[0] for v in versions] == [1, 2, 3, 4]
    again.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.sqlite"
    Registry(path).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO schema_version VALUES (99, 0)")
    db.commit()
    db.close()
    with pytest.raises(RegistryError, match="schema version 99 is newer"):
        Registry(path)


# --- tamper detection ------------------------------------------------------------------------

def test_changed_or_truncated_checkpoint_is_refused(reg, tmp_path):
    from workers.checkpoint import load_model, save_model
    from workers.models import build_model
    from workers.specs import ArchSpec

    d = tmp_path / "generations" / "g0"
    sha = save_model(build_model(ArchSpec(), 64, 10), d)
    f = d / "model.pt"
    reg.add_generation("g0", None, "mlp", "cfg", str(f), sha)
    assert reg.verify_checkpoint("g0") == f
    load_model(reg.verify_checkpoint("g0"), sha)  # the verified file loads
    good = f.read_bytes()

    changed = bytearray(good)
    changed[len(changed) // 2] ^= 0xFF
    f.write_bytes(bytes(changed))
    with pytest.raises(IntegrityError) as e:
        reg.verify_checkpoint("g0")
    msg = str(e.value)
    import hashlib
    assert str(f) in msg and sha in msg and hashlib.sha256(bytes(changed)).hexdigest() in msg
    assert "changed or truncated" in msg

    f.write_bytes(good[: len(good) // 3])
    with pytest.raises(IntegrityError, match=f"{hashlib.sha256(good[:len(good) // 3]).hexdigest()}.*{sha}"):
        reg.verify_checkpoint("g0")

    f.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        reg.verify_checkpoint("g0")
    f.write_bytes(good)
    # a file:// URI and a directory are accepted too
    reg.add_generation("g1", "g0", "mlp", "cfg", f"file://{d}", sha)
    assert reg.verify_checkpoint("g1") == f
    reg.add_generation("g2", "g1", "mlp", "cfg", "s3://bucket/g2", sha)
    with pytest.raises(RegistryError, match="only local paths"):
        reg.verify_checkpoint("g2")


# --- concurrency: two real processes ----------------------------------------------------------

N_WRITES = 60


def _writer(path: str, who: str, barrier, out) -> None:
    try:
        reg = Registry(path, password_env=PASSWORD_ENV)
        barrier.wait(timeout=30)
        for k in range(N_WRITES):
            name = f"{who}-{k}"
            reg.add_generation(name, None, "mlp", "cfg", f"/c/{name}", format(k, "064x"), {"k": k}, actor=who)
            reg.record_evaluation(name, None, {"k": k}, k % 2 == 0, [])
            reg.audit(who, "note", "shared", str(k))
        reg.close()
        out.put((who, "ok"))
    except Exception as e:  # reported to the parent, which fails the test
        out.put((who, f"{type(e).__name__}: {e}"))


def _cas(path: str, rid: int, who: str, barrier, out) -> None:
    reg = Registry(path, password_env=PASSWORD_ENV)
    barrier.wait(timeout=30)
    try:
        reg.transition(rid, ("shadow", 0), state="canary" if who == "a" else "rolled_back", step=0,
                       weight=0.1 if who == "a" else 0.0, actor=who, action=who, reason="race")
        out.put((who, "won"))
    except StaleTransition:
        out.put((who, "stale"))
    reg.close()


def _run(target, args_by_who):
    ctx = mp.get_context("spawn")  # fresh interpreters: no shared connection inherited
    barrier, out = ctx.Barrier(len(args_by_who)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, out)) for args in args_by_who]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_two_processes_writing_at_once_lose_nothing(location):
    path = str(location)
    Registry(path, password_env=PASSWORD_ENV).close()
    results = _run(_writer, [(path, "a"), (path, "b")])
    assert results == {"a": "ok", "b": "ok"}
    reg = Registry(path, password_env=PASSWORD_ENV)
    gens = reg.generations()
    assert len(gens) == 2 * N_WRITES
    assert {g.name for g in gens} == {f"{w}-{k}" for w in "ab" for k in range(N_WRITES)}
    assert len(reg.evaluations()) == 2 * N_WRITES
    notes = reg.events("shared")
    assert len(notes) == 2 * N_WRITES
    # each writer's own events are in its order; event ids are unique and increasing
    for w in "ab":
        assert [e.reason for e in notes if e.actor == w] == [str(k) for k in range(N_WRITES)]
    ids = [e.id for e in reg.events()]
    assert ids == sorted(set(ids)) and len(ids) == 6 * N_WRITES  # registered + evaluated + note


def test_concurrent_transitions_one_wins(location):
    path = str(location)
    reg = Registry(path, password_env=PASSWORD_ENV)
    _chain(reg, ("g0", "g1"))
    rid = reg.start_rollout("g1", "g0", "ctl", "go").id
    results = _run(_cas, [(path, rid, "a"), (path, rid, "b")])
    assert sorted(results.values()) == ["stale", "won"]
    winner = next(w for w, v in results.items() if v == "won")
    r = reg.rollout(rid)
    assert r.state == {"a": "canary", "b": "rolled_back"}[winner]
    assert reg.generation("g1").status == {"a": "canary", "b": "rolled_back"}[winner]
    assert [e.actor for e in reg.events("g1") if e.action in ("a", "b")] == [winner]
    reg.close()


# --- retraining a served generation (it must never hand production back to g0) --------------

def test_served_generations_cannot_be_replaced(reg):
    _chain(reg, ("g0", "g1", "g2", "g3"))
    reg.set_status("g0", "production", "train", "bootstrap")
    r = reg.start_rollout("g1", "g0", "ctl", "go")
    reg.transition(r.id, ("shadow", 0), state="promoted", step=0, weight=1.0, actor="ctl", action="promote",
                   reason="ok")
    r2 = reg.start_rollout("g2", "g1", "ctl", "next")
    reg.transition(r2.id, ("shadow", 0), state="canary", step=0, weight=0.1, actor="ctl", action="advance",
                   reason="")
    before = (reg.generations(), len(reg.events()))
    # production, canary (the active candidate), and g1 also as the active baseline
    for name, why in (("g1", "it is in production"), ("g2", "it is in canary")):
        with pytest.raises(RegistryError, match=f"generation '{name}' cannot be retrained or replaced: {why}. "
                                                "Retrain under a new generation name, or retire it first"):
            reg.add_generation(name, None, "mlp", "cfg", "/new", "e" * 64, replace=True)
        with pytest.raises(RegistryError, match=why):
            reg.check_replaceable(name)
    assert (reg.generations(), len(reg.events())) == before  # nothing stored
    assert reg.production().name == "g1"
    # a paused rollout keeps its candidate served; a baseline named by an active rollout is served
    reg.transition(r2.id, ("canary", 0), state="paused", step=0, weight=0.1, actor="bob", action="pause", reason="")
    _raw(reg, "UPDATE generations SET status = 'retired' WHERE name = 'g1'")  # baseline check alone
    with pytest.raises(RegistryError, match="it is the baseline of active rollout"):
        reg.check_replaceable("g1")
    reg.transition(r2.id, ("paused", 0), state="rolled_back", step=0, weight=0.0, actor="ctl", action="rollback",
                   reason="")
    # finished rollouts: retired/rolled_back/trained generations and unknown names may be replaced
    for name in ("g0", "g2", "g3", "nope"):
        reg.check_replaceable(name)
    assert reg.add_generation("g2", "g1", "mlp", "cfg", "/new", "e" * 64, replace=True).status == "trained"


def test_bootstrap_production_only_when_nothing_ever_was(reg):
    _chain(reg)
    assert reg.ever_in_production() is False
    assert reg.bootstrap_production("g0", "train") is True
    assert reg.production().name == "g0" and reg.events("g0")[-1].reason == "bootstrap: first generation"
    assert reg.bootstrap_production("g0", "train") is False  # already production: no new event
    # production retired by hand: nothing is production now, but g0 must not come back
    reg.set_status("g0", "retired", "alice", "decommissioned")
    assert reg.production() is None and reg.ever_in_production() is True
    assert reg.bootstrap_production("g0", "train") is False
    assert reg.generation("g0").status == "retired"
    with pytest.raises(RegistryError, match="unknown generation 'g9'"):
        reg.bootstrap_production("g9", "train")


def test_ever_in_production_reads_the_audit_log(tmp_path):
    """Statuses alone can lose the history (a retired generation retrained is 'trained'
    again); the audit log still says production existed."""
    with Registry(tmp_path / "registry.sqlite") as reg:
        _chain(reg)
        reg.set_status("g1", "production", "alice", "manual")
        reg.set_status("g1", "retired", "alice", "off")
        reg.add_generation("g1", "g0", "mlp", "cfg", "/new", "e" * 64, replace=True)
        assert [g.status for g in reg.generations()] == ["trained", "trained", "trained"]
        assert reg.ever_in_production() is True
        assert reg.bootstrap_production("g0", "train") is False


def _run_dir_chain(tmp_path):
    """A config of g0, g1, g2 whose run dir holds model.pt + metrics.json for each (the
    bytes are only hashed here), recorded in the registry with g0 bootstrapped."""
    from orchestrator.config import load_config
    from orchestrator.registry import register_trained

    path = tmp_path / "c.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\ngenerations: [{{name: g0}}, {{name: g1}}, {{name: g2}}]\n")
    cfg = load_config(str(path))
    for name in ("g0", "g1", "g2"):
        write_generation(cfg, name, f"{name} weights v1".encode())
        register_trained(cfg, name)
    return path, cfg


def write_generation(cfg, name, data):
    """The files `graceful train` leaves: model.pt and a metrics.json naming its sha256."""
    import hashlib
    import json

    d = cfg.run_dir / "generations" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.pt").write_bytes(data)
    (d / "metrics.json").write_text(json.dumps({"name": name, "sha256": hashlib.sha256(data).hexdigest()}))


def test_retraining_production_never_hands_production_back_to_g0(tmp_path):
    from orchestrator.registry import register_trained

    _, cfg = _run_dir_chain(tmp_path)
    with Registry(registry_path(cfg)) as reg:
        assert reg.production().name == "g0"
        r = reg.start_rollout("g1", "g0", "ctl", "go")
        reg.transition(r.id, ("shadow", 0), state="promoted", step=0, weight=1.0, actor="ctl", action="promote",
                       reason="ok")
        served = reg.generation("g1")
        write_generation(cfg, "g1", b"g1 weights v2")  # a retrain left new files
        with pytest.raises(RegistryError, match="'g1' cannot be retrained or replaced: it is in production"):
            register_trained(cfg, "g1", registry=reg)
        assert reg.generation("g1") == served and reg.production().name == "g1"
        assert reg.generation("g0").status == "retired"
        # production retired by hand, then g1 retrained: allowed, and g0 is not brought back
        reg.set_status("g1", "retired", "alice", "decommissioned")
        rec = register_trained(cfg, "g1", registry=reg)
        assert rec.status == "trained" and rec.sha256 != served.sha256
        assert reg.production() is None and reg.generation("g0").status == "retired"


def test_graceful_train_of_a_served_generation_fails_before_training(tmp_path, capsys):
    from orchestrator.cli import main

    path, cfg = _run_dir_chain(tmp_path)
    with Registry(registry_path(cfg)) as reg:
        reg.start_rollout("g1", "g0", "ctl", "go")
        before = (reg.generations(), len(reg.events()))
    model = cfg.run_dir / "generations" / "g0" / "model.pt"
    for name, why in (("g0", "it is in production"), ("g1", "it is in shadow")):
        assert main(["train", str(path), "--generation", name, "--force"]) == 1
        out = capsys.readouterr()
        # refused up front: Ray (refused in unit tests) was never started
        assert f"error: generation {name!r} cannot be retrained or replaced: {why}" in out.out
        assert "must not start Ray" not in out.out + out.err
    assert model.read_bytes() == b"g0 weights v1"
    with Registry(registry_path(cfg)) as reg:
        assert (reg.generations(), len(reg.events())) == before


def test_events_filter_by_subject_and_action_newest_last(reg):
    """Six events: a/x, b/x, a/y, a/x, a/z, b/y. Of subject a, actions x or y: ids 1, 3, 4
    in order; the newest one of them: 4; actions=() selects nothing."""
    for subject, action in (("a", "x"), ("b", "x"), ("a", "y"), ("a", "x"), ("a", "z"), ("b", "y")):
        reg.audit("t", action, subject, f"{subject}/{action}")
    got = reg.events("a", actions=("x", "y"))
    assert [e.reason for e in got] == ["a/x", "a/y", "a/x"] and got[0].id < got[1].id < got[2].id
    assert [e.id for e in reg.events("a", limit=1, actions=("x", "y"))] == [got[-1].id]
    assert [e.reason for e in reg.events(actions=("y",))] == ["a/y", "b/y"]
    assert reg.events("a", actions=()) == []


def test_audit_change_appends_only_a_change(reg):
    """Stage events of g1: evaluate, evaluate again (nothing), rollout; from_state follows
    the previous one; pause/resume tracked together among two actions."""
    first = reg.audit_change("p", "stage", "g1", "evaluate")
    assert (first.from_state, first.to_state, first.reason) == (None, "evaluate", "new -> evaluate")
    assert reg.audit_change("p", "stage", "g1", "evaluate") is None
    nxt = reg.audit_change("p", "stage", "g1", "rollout")
    assert (nxt.from_state, nxt.to_state) == ("evaluate", "rollout")
    kinds = ("pause", "resume")
    assert reg.audit_change("alice", "pause", "pipe", among=kinds, reason="freeze").reason == "freeze"
    assert reg.audit_change("bob", "pause", "pipe", among=kinds) is None
    assert reg.audit_change("bob", "resume", "pipe", among=kinds) is not None
    assert [e.action for e in reg.events("pipe")] == ["pause", "resume"]


def test_processes_recording_the_same_change_at_once_record_it_once(location):
    """Four threads, each with its own connection, record g1's move to `rollout` at the
    same moment: one event; the others are told nothing changed."""
    import threading

    regs = [Registry(location, password_env=PASSWORD_ENV) for _ in range(4)]
    barrier, got = threading.Barrier(4), []

    def record(r):
        barrier.wait(10)
        got.append(r.audit_change("p", "pipeline_stage", "g1", "rollout"))

    threads = [threading.Thread(target=record, args=(r,)) for r in regs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert sum(e is not None for e in got) == 1 and len(got) == 4
        assert len(regs[0].events("g1", actions=("pipeline_stage",))) == 1
    finally:
        for r in regs:
            r.close()
