"""The registry store: generations and their lineage, offline evaluations, rollouts,
operator commands, controller leases and an append-only audit log, in one SQLite file
(`run_dir/registry.sqlite`, the embedded default) or one PostgreSQL database
(`registry.url`, for clusters whose pods share it).

The controller, the pipeline and any number of CLI processes use it at the same time:
every write is one transaction and writers are serialised by the backend
(`orchestrator.registry.backends`), so a compare-and-set reads and writes with nobody in
between, and concurrent writers wait for each other and lose nothing. The SQL here is
written once for both engines.

The schema and its migrations live in `orchestrator.registry.schema`. The audit log
(`events`) has no update or delete API, and triggers refuse UPDATE and DELETE on it from
any client.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from orchestrator.registry.records import (ACTIVE_STATES, COMMANDS, FINAL_STATES, GEN_STATUSES, HELD_STATES, ROLLOUT_STATES,
                                           SERVED_STATUSES, Command, CommandKind, Event, GenerationRecord,
                                           GenerationStatus, Lease, RolloutRecord, RolloutState)
from orchestrator.registry.backends import BackendError, Tx, open_backend
from workers.checkpoint import CheckpointError, model_file, sha256_file

T = TypeVar("T")

_ACTIVE_SQL = "(" + ", ".join(f"'{s.value}'" for s in ACTIVE_STATES) + ")"

class RegistryError(RuntimeError):
    """A bad request against the registry (unknown name, bad status, ...)."""


class StaleTransition(RegistryError):
    """Compare-and-set failed: somebody moved the rollout first."""


class IntegrityError(RegistryError):
    """A checkpoint whose bytes are not the ones recorded (changed, truncated or missing)."""




class LeaseHeld(RegistryError):
    """Another controller holds the rollout's lease (the message names it)."""


class LeaseLost(RegistryError):
    """This controller's lease expired and another took it, or it was released."""


def _loads(s: Optional[str]) -> Any:
    return json.loads(s) if s else {}


def _dumps(v: Any) -> str:
    return json.dumps(v if v is not None else {}, sort_keys=True, default=_json_default)


def _json_default(o: Any) -> Any:
    # numpy scalars and arrays from metric computations
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def checkpoint_path(uri: str) -> Path:
    """The local file a checkpoint URI names (`workers.checkpoint.model_file`: a plain path
    or `file://...`); RegistryError for any other scheme."""
    try:
        return model_file(uri)
    except CheckpointError as e:
        raise RegistryError(str(e)) from None



class Registry:
    """One registry: a SQLite file or a PostgreSQL database (`orchestrator.registry.backends`).
    Safe to share between threads (one lock per instance) and between processes (the
    backend serialises writers); every write method is one transaction."""

    def __init__(self, location: str | Path, readonly: bool = False, password_env: Optional[str] = None):
        """Open (creating and migrating) the registry at `location`: a file path, or a
        postgresql:// URL whose password is read from the environment variable
        `password_env`. `readonly`: open an existing registry for reading only, never
        migrating or writing (what a router replica needs; any write raises)."""
        self.readonly = readonly
        self.password_env = password_env
        try:
            self._backend = open_backend(location, readonly=readonly, password_env=password_env)
        except BackendError as e:
            raise RegistryError(str(e)) from None
        # Where it is, for messages and for reopening elsewhere (a URL never holds a password).
        self.location: str = self._backend.location
        self.path: Optional[Path] = getattr(self._backend, "path", None)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------------

    def _write(self, fn: Callable[[Tx], T]) -> T:
        """`fn` in one write transaction (all or nothing)."""
        if self.readonly:
            raise RegistryError(f"the registry at {self.location} was opened read-only; it writes nothing")
        try:
            return self._backend.write(fn)
        except BackendError as e:
            raise RegistryError(str(e)) from e

    def _query(self, fn: Callable[[Tx], T]) -> T:
        try:
            return self._backend.read(fn)
        except BackendError as e:
            raise RegistryError(str(e)) from e

    def _read(self, sql: str, args: tuple = ()) -> list[Any]:
        return self._query(lambda tx: tx.execute(sql, args).fetchall())

    def schema_version(self) -> int:
        """The version of the registry's schema (SCHEMA_VERSION once opened)."""
        return int(self._read("SELECT COALESCE(MAX(version), 0) FROM schema_version")[0][0])

    # --- row conversion --------------------------------------------------------------------

    @staticmethod
    def _gen(r: Any) -> GenerationRecord:
        return GenerationRecord(r["name"], r["parent"], r["arch"], r["config_hash"], r["checkpoint_uri"],
                                r["sha256"], r["created_at"], GenerationStatus(r["status"]), _loads(r["metrics"]))

    @staticmethod
    def _rollout(r: Any) -> RolloutRecord:
        return RolloutRecord(r["id"], r["candidate"], r["baseline"], RolloutState(r["state"]), r["step"],
                             r["weight"], RolloutState(r["paused_from"]) if r["paused_from"] else None, r["step_started_at"], r["started_at"], r["updated_at"],
                             r["finished_at"], _loads(r["data"]))

    @staticmethod
    def _command(r: Any) -> Command:
        return Command(r["id"], r["rollout_id"], CommandKind(r["command"]), r["actor"], r["reason"], bool(r["force"]),
                       r["created_at"], r["done_at"], r["outcome"])

    @staticmethod
    def _event(r: Any) -> Event:
        return Event(r["id"], r["at"], r["actor"], r["action"], r["subject"], r["reason"], r["from_state"],
                     r["to_state"], _loads(r["data"]))

    @staticmethod
    def _audit_in(db: Tx, actor: str, action: str, subject: str, reason: str = "",
                  from_state: Optional[str] = None, to_state: Optional[str] = None,
                  data: Optional[dict] = None) -> Event:
        at = time.time()
        eid = db.insert("INSERT INTO events (at, actor, action, subject, reason, from_state, to_state, data) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (at, actor, action, subject, reason or "", from_state, to_state, _dumps(data)))
        return Event(eid, at, actor, action, subject, reason or "", from_state, to_state,
                     dict(data or {}))

    @staticmethod
    def _gen_in(db: Tx, name: str) -> Optional[GenerationRecord]:
        r = db.execute("SELECT * FROM generations WHERE name = ?", (name,)).fetchone()
        return Registry._gen(r) if r else None

    def _need_gen_in(self, db: Tx, name: str) -> GenerationRecord:
        g = self._gen_in(db, name)
        if g is None:
            known = [r[0] for r in db.execute("SELECT name FROM generations ORDER BY created_at, name")]
            raise RegistryError(f"unknown generation {name!r} in {self.location}; registered: {known}")
        return g

    def _status_in(self, db: Tx, name: str, status: str, actor: str, reason: str,
                   data: Optional[dict] = None) -> GenerationRecord:
        if status not in GEN_STATUSES:
            raise RegistryError(f"status {status!r} is not one of {[x.value for x in GEN_STATUSES]}")
        g = self._need_gen_in(db, name)
        if g.status == status:
            return g
        db.execute("UPDATE generations SET status = ? WHERE name = ?", (status, name))
        self._audit_in(db, actor, "status", name, reason, g.status, status, data)
        return self._need_gen_in(db, name)

    # --- generations -----------------------------------------------------------------------

    def add_generation(self, name: str, parent: Optional[str], arch: str, config_hash: str,
                       checkpoint_uri: str, sha256: str, metrics: Optional[dict] = None,
                       actor: str = "cli", replace: bool = False) -> GenerationRecord:
        """Register a trained generation (status 'trained'), audited as 'registered'.

        Idempotent for the same sha256 (returns the existing record). A different sha256
        under the same name is refused unless `replace`, which records the new checkpoint,
        resets the status to 'trained' and is audited as 'replaced'. Replacing a generation
        that is served (status production, shadow or canary, or named by an active
        rollout) is always refused: see `check_replaceable`."""
        if not name:
            raise RegistryError("a generation needs a name")
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise RegistryError(f"sha256 of {name!r} must be 64 lowercase hex digits, got {sha256!r}")
        if parent == name:
            raise RegistryError(f"generation {name!r} cannot be its own parent")

        def run(db: Tx) -> GenerationRecord:
            if parent is not None and self._gen_in(db, parent) is None:
                raise RegistryError(f"parent {parent!r} of {name!r} is not registered; register it first")
            old = self._gen_in(db, name)
            if old is not None:
                if old.sha256 == sha256:
                    return old
                if not replace:
                    raise RegistryError(f"generation {name!r} is registered with sha256 {old.sha256}, "
                                        f"not {sha256}; pass replace=True to record the new checkpoint")
                self._refuse_replace_in(db, name)
                db.execute("UPDATE generations SET parent = ?, arch = ?, config_hash = ?, checkpoint_uri = ?, "
                           "sha256 = ?, status = 'trained', metrics = ? WHERE name = ?",
                           (parent, arch, config_hash, checkpoint_uri, sha256, _dumps(metrics), name))
                self._audit_in(db, actor, "replaced", name, f"new checkpoint {checkpoint_uri}",
                               old.status, "trained", {"old_sha256": old.sha256, "sha256": sha256})
                return self._need_gen_in(db, name)
            db.execute("INSERT INTO generations (name, parent, arch, config_hash, checkpoint_uri, sha256, "
                       "created_at, status, metrics) VALUES (?, ?, ?, ?, ?, ?, ?, 'trained', ?)",
                       (name, parent, arch, config_hash, checkpoint_uri, sha256, time.time(), _dumps(metrics)))
            self._audit_in(db, actor, "registered", name, f"checkpoint {checkpoint_uri}", None, "trained",
                           {"sha256": sha256, "parent": parent, "config_hash": config_hash})
            return self._need_gen_in(db, name)

        return self._write(run)

    @staticmethod
    def _replace_refusal_in(db: Tx, name: str) -> Optional[str]:
        g = Registry._gen_in(db, name)
        if g is None:
            return None
        if g.status in SERVED_STATUSES:
            why = f"it is in {g.status}"
        else:
            r = db.execute("SELECT id, candidate, baseline, state FROM rollouts WHERE state IN "
                           + _ACTIVE_SQL + " AND (candidate = ? OR baseline = ?) ORDER BY id DESC",
                           (name, name)).fetchone()
            if r is None:
                return None
            role = "candidate" if r["candidate"] == name else "baseline"
            why = f"it is the {role} of active rollout {r['id']} ({r['state']})"
        # The router serves the bytes it loaded: new bytes under a served name would make the
        # registry's sha256 disagree with what is served (and a promote would record the wrong one).
        return (f"generation {name!r} cannot be retrained or replaced: {why}. Retrain under a new "
                f"generation name, or retire it first (finish its rollout, or promote another generation)")

    def _refuse_replace_in(self, db: Tx, name: str) -> None:
        why = self._replace_refusal_in(db, name)
        if why is not None:
            raise RegistryError(why)

    def check_replaceable(self, name: str) -> None:
        """Raise RegistryError when `name`'s checkpoint may not be replaced: its status is
        production, shadow or canary, or an active rollout names it (candidate or baseline).
        An unregistered name is replaceable. `graceful train` asks this before training."""
        why = self._query(lambda db: self._replace_refusal_in(db, name))
        if why is not None:
            raise RegistryError(why)

    def ever_in_production(self) -> bool:
        """Whether any generation has ever been in production (now, or per the audit log)."""
        return self._query(self._ever_in_production_in)

    @staticmethod
    def _ever_in_production_in(db: Tx) -> bool:
        # Retired generations were production; a rolled-back one, like any rollout, had a
        # serving baseline; the audit log remembers every status change to production.
        return any(db.execute(sql).fetchone() is not None for sql in (
            "SELECT 1 FROM generations WHERE status IN ('production', 'retired', 'rolled_back') LIMIT 1",
            "SELECT 1 FROM rollouts LIMIT 1",
            "SELECT 1 FROM events WHERE to_state IN ('production', 'promoted') LIMIT 1",
        ))

    def bootstrap_production(self, name: str, actor: str, reason: str = "bootstrap: first generation") -> bool:
        """Make `name` production when no generation has ever been production, in one
        transaction; True when it did. A chain whose production was retired or rolled back
        is never handed back to its first generation by this."""

        def run(db: Tx) -> bool:
            self._need_gen_in(db, name)
            if self._ever_in_production_in(db):
                return False
            self._status_in(db, name, GenerationStatus.PRODUCTION, actor, reason)
            return True

        return self._write(run)

    def generation(self, name: str) -> Optional[GenerationRecord]:
        rows = self._read("SELECT * FROM generations WHERE name = ?", (name,))
        return self._gen(rows[0]) if rows else None

    def generations(self) -> list[GenerationRecord]:
        """Every generation, in creation order."""
        return [self._gen(r) for r in self._read("SELECT * FROM generations ORDER BY created_at, name")]

    def set_status(self, name: str, status: str, actor: str, reason: str) -> GenerationRecord:
        """Set a generation's status (audited as 'status' with from and to). Setting
        'production' retires the previous production generation in the same transaction."""

        def run(db: Tx) -> GenerationRecord:
            self._need_gen_in(db, name)
            if status == GenerationStatus.PRODUCTION:
                for r in db.execute("SELECT name FROM generations WHERE status = 'production' AND name != ?",
                                    (name,)).fetchall():
                    self._status_in(db, r[0], GenerationStatus.RETIRED, actor, f"replaced in production by {name}: {reason}")
            return self._status_in(db, name, status, actor, reason)

        return self._write(run)

    def lineage(self, name: str) -> list[GenerationRecord]:
        """The chain from the oldest registered ancestor to `name` (inclusive)."""
        out: list[GenerationRecord] = []
        seen: set[str] = set()
        current: Optional[str] = name
        while current is not None and current not in seen:
            g = self.generation(current)
            if g is None:
                if current == name:
                    raise RegistryError(f"unknown generation {name!r}")
                break
            seen.add(current)
            out.append(g)
            current = g.parent
        return out[::-1]

    def production(self) -> Optional[GenerationRecord]:
        rows = self._read("SELECT * FROM generations WHERE status = 'production' ORDER BY created_at DESC, name DESC LIMIT 1")
        return self._gen(rows[0]) if rows else None

    def ever_production(self) -> list[str]:
        """Every generation that was ever production with the bytes it has now (the audit
        log remembers each status change to production, and each replaced checkpoint),
        ordered by when they last got there: the current one last."""
        rows = self._read("SELECT subject, MAX(id) AS last FROM events WHERE action = 'status' AND "
                          "to_state = 'production' GROUP BY subject ORDER BY last")
        # A generation retrained since it was production (new bytes under its name) was
        # never production with the bytes it has now.
        replaced = {r["subject"]: r["last"] for r in
                    self._read("SELECT subject, MAX(id) AS last FROM events WHERE action = 'replaced' GROUP BY subject")}
        names = [r["subject"] for r in rows if replaced.get(r["subject"], -1) < r["last"]]
        prod = self.production()
        if prod is not None and prod.name not in names:
            names.append(prod.name)
        return names

    def verify_checkpoint(self, name: str) -> Path:
        """The checkpoint file of `name`, after checking its sha256 against the record.
        Raises IntegrityError naming the file and both hashes when they differ (or the
        file is gone): nothing may be loaded or served from it."""
        g = self.generation(name)
        if g is None:
            raise RegistryError(f"unknown generation {name!r}")
        path = checkpoint_path(g.checkpoint_uri)
        if not path.is_file():
            raise IntegrityError(f"checkpoint of {name!r} is missing: {path} (recorded sha256 {g.sha256})")
        actual = sha256_file(path)
        if actual != g.sha256:
            raise IntegrityError(f"checkpoint of {name!r} was changed or truncated: {path} has sha256 {actual}, "
                                 f"the registry recorded {g.sha256}; refusing to use it")
        return path

    # --- evaluations -----------------------------------------------------------------------

    def record_evaluation(self, candidate: str, baseline: Optional[str], metrics: dict, passed: bool,
                          reasons: list[str], actor: str = "evaluate") -> int:
        """Store one offline evaluation (audited as 'evaluated'); returns its id."""

        def run(db: Tx) -> int:
            self._need_gen_in(db, candidate)
            if baseline is not None:
                self._need_gen_in(db, baseline)
            eid = db.insert("INSERT INTO evaluations (candidate, baseline, metrics, passed, reasons, created_at) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (candidate, baseline, _dumps(metrics), int(bool(passed)), json.dumps(list(reasons)),
                              time.time()))
            self._audit_in(db, actor, "evaluated", candidate,
                           ("passed" if passed else "failed: " + "; ".join(reasons)),
                           None, None, {"evaluation_id": eid, "baseline": baseline, "passed": bool(passed)})
            return eid

        return self._write(run)

    def evaluations(self, candidate: Optional[str] = None) -> list[dict]:
        """Evaluations, oldest first: id, candidate, baseline, metrics, passed, reasons, created_at."""
        sql, args = "SELECT * FROM evaluations", ()
        if candidate is not None:
            sql, args = sql + " WHERE candidate = ?", (candidate,)
        return [{"id": r["id"], "candidate": r["candidate"], "baseline": r["baseline"],
                 "metrics": _loads(r["metrics"]), "passed": bool(r["passed"]),
                 "reasons": json.loads(r["reasons"]), "created_at": r["created_at"]}
                for r in self._read(sql + " ORDER BY id", args)]

    # --- rollouts --------------------------------------------------------------------------

    def start_rollout(self, candidate: str, baseline: str, actor: str, reason: str,
                      data: Optional[dict] = None, baseline_is_production: bool = False) -> RolloutRecord:
        """Start a rollout in state 'shadow' (step 0, weight 0); the candidate's status
        becomes 'shadow'. RegistryError while another rollout is active; with
        `baseline_is_production`, StaleTransition unless `baseline` is production in the
        same transaction (a promotion in between cannot slip in)."""
        if candidate == baseline:
            raise RegistryError(f"candidate and baseline are the same generation {candidate!r}")

        def run(db: Tx) -> RolloutRecord:
            self._need_gen_in(db, candidate)
            base = self._need_gen_in(db, baseline)
            if baseline_is_production and base.status != GenerationStatus.PRODUCTION:
                raise StaleTransition(f"{baseline!r} is no longer production ({base.status}); start again")
            active = db.execute("SELECT * FROM rollouts WHERE state IN " + _ACTIVE_SQL).fetchone()
            if active is not None:
                raise RegistryError(f"rollout {active['id']} of {active['candidate']!r} is still active "
                                    f"({active['state']}); finish it before starting another")
            now = time.time()
            rid = db.insert("INSERT INTO rollouts (candidate, baseline, state, step, weight, paused_from, "
                             "step_started_at, started_at, updated_at, finished_at, data) "
                             "VALUES (?, ?, 'shadow', 0, 0.0, NULL, ?, ?, ?, NULL, ?)",
                             (candidate, baseline, now, now, now, _dumps(data)))
            self._audit_in(db, actor, "rollout_started", candidate, reason, None, "shadow",
                           {"rollout_id": rid, "baseline": baseline})
            self._status_in(db, candidate, GenerationStatus.SHADOW, actor, f"rollout {rid} started", {"rollout_id": rid})
            return self._rollout(db.execute("SELECT * FROM rollouts WHERE id = ?", (rid,)).fetchone())

        return self._write(run)

    def rollout(self, rollout_id: int) -> Optional[RolloutRecord]:
        rows = self._read("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        return self._rollout(rows[0]) if rows else None

    def active_rollout(self) -> Optional[RolloutRecord]:
        rows = self._read("SELECT * FROM rollouts WHERE state IN " + _ACTIVE_SQL + " "
                          "ORDER BY id DESC LIMIT 1")
        return self._rollout(rows[0]) if rows else None

    def latest_rollout(self, candidate: Optional[str] = None) -> Optional[RolloutRecord]:
        sql, args = "SELECT * FROM rollouts", ()
        if candidate is not None:
            sql, args = sql + " WHERE candidate = ?", (candidate,)
        rows = self._read(sql + " ORDER BY id DESC LIMIT 1", args)
        return self._rollout(rows[0]) if rows else None

    def transition(self, rollout_id: int, expect: tuple[str, int], *, state: str, step: int, weight: float,
                   actor: str, action: str, reason: str, data: Optional[dict] = None,
                   step_started_at: Optional[float] = None, holder: Optional[str] = None,
                   now: Optional[float] = None) -> RolloutRecord:
        """Move a rollout, compare-and-set, in ONE transaction.

        With `holder` (a controller), the move is fenced by the lease: LeaseLost unless
        `holder` holds an unexpired lease on the rollout at `now` (default: the wall clock),
        so a controller whose lease was taken over while it was slow moves nothing.

        Checks (state, step) == `expect` (else StaleTransition); updates the rollout
        (`data`, when given, replaces the stored data; `step_started_at` defaults to now
        when the step or the state (other than pausing/resuming) changes, else it is kept;
        `paused_from` remembers the state a pause or freeze left); sets the generations'
        statuses (shadow/canary -> candidate shadow/canary; guarding or promoted ->
        candidate production and baseline retired, once; rolled_back -> candidate
        rolled_back, and after guarding the baseline production again); appends an audit event
        (subject: the candidate; data: rollout id, step, weight)."""
        if state not in ROLLOUT_STATES:
            raise RegistryError(f"rollout state {state!r} is not one of {[x.value for x in ROLLOUT_STATES]}")
        if not 0.0 <= float(weight) <= 1.0:
            raise RegistryError(f"weight must be within [0, 1], got {weight}")
        fence_at = now

        def run(db: Tx) -> RolloutRecord:
            row = db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            if row is None:
                raise RegistryError(f"unknown rollout {rollout_id}")
            cur = self._rollout(row)
            if (cur.state, cur.step) != tuple(expect):
                raise StaleTransition(f"rollout {rollout_id} is at ({cur.state}, step {cur.step}), "
                                      f"not the expected ({expect[0]}, step {expect[1]}); reread and decide again")
            if cur.state in FINAL_STATES:
                raise RegistryError(f"rollout {rollout_id} is finished ({cur.state}); start a new one")
            if holder is not None:
                lease = db.execute("SELECT holder, expires_at FROM leases WHERE rollout_id = ?",
                                   (rollout_id,)).fetchone()
                at = time.time() if fence_at is None else fence_at
                if lease is None or lease["holder"] != holder or lease["expires_at"] <= at:
                    raise LeaseLost(f"controller {holder!r} no longer holds the lease of rollout {rollout_id}"
                                    + (f" ({lease['holder']!r} does)" if lease is not None else "")
                                    + "; it moves nothing")
            now = time.time()
            if state in HELD_STATES:
                paused_from = cur.position
            else:
                paused_from = None
            pause_or_resume = state in HELD_STATES or cur.state in HELD_STATES
            if step_started_at is None:
                moved = step != cur.step or (state != cur.state and not pause_or_resume)
                started = now if moved else cur.step_started_at
            else:
                started = float(step_started_at)
            finished = now if state in FINAL_STATES else None
            db.execute("UPDATE rollouts SET state = ?, step = ?, weight = ?, paused_from = ?, step_started_at = ?, "
                       "updated_at = ?, finished_at = ?, data = ? WHERE id = ?",
                       (state, int(step), float(weight), paused_from, started, now, finished,
                        _dumps(data) if data is not None else _dumps(cur.data), rollout_id))
            ctx = {"rollout_id": rollout_id, "step": int(step), "weight": float(weight)}
            self._audit_in(db, actor, action, cur.candidate, reason, cur.state, state, ctx)
            why = f"rollout {rollout_id} {action}: {reason}"
            if state in (RolloutState.SHADOW, RolloutState.CANARY):
                self._status_in(db, cur.candidate, state, actor, why, ctx)
            elif state in (RolloutState.GUARDING, RolloutState.PROMOTED) and cur.position != RolloutState.GUARDING:
                for r in db.execute("SELECT name FROM generations WHERE status = 'production' AND name != ?",
                                    (cur.candidate,)).fetchall():
                    self._status_in(db, r[0], GenerationStatus.RETIRED, actor, why, ctx)
                self._status_in(db, cur.baseline, GenerationStatus.RETIRED, actor, why, ctx)
                self._status_in(db, cur.candidate, GenerationStatus.PRODUCTION, actor, why, ctx)
            elif state == RolloutState.ROLLED_BACK:
                self._status_in(db, cur.candidate, GenerationStatus.ROLLED_BACK, actor, why, ctx)
                if cur.position == RolloutState.GUARDING:  # promoted already: undo it
                    self._status_in(db, cur.baseline, GenerationStatus.PRODUCTION, actor, why, ctx)
            return self._rollout(db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone())

        return self._write(run)

    # --- operator commands -----------------------------------------------------------------

    def enqueue_command(self, rollout_id: int, command: str, actor: str, reason: str,
                        force: bool = False) -> Command:
        """Queue an operator command for the controller's next tick (audited as 'requested')."""
        if command not in COMMANDS:
            raise RegistryError(f"command {command!r} is not one of {[x.value for x in COMMANDS]}")

        def run(db: Tx) -> Command:
            r = db.execute("SELECT candidate FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            if r is None:
                raise RegistryError(f"unknown rollout {rollout_id}")
            now = time.time()
            cid = db.insert("INSERT INTO commands (rollout_id, command, actor, reason, force, created_at) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (rollout_id, command, actor, reason, int(force), now))
            self._audit_in(db, actor, "requested", r["candidate"], reason, None, None,
                           {"command": command, "command_id": cid, "rollout_id": rollout_id, "force": bool(force)})
            return Command(cid, rollout_id, command, actor, reason, bool(force), now, None, None)

        return self._write(run)

    def pending_commands(self, rollout_id: int) -> list[Command]:
        """Commands of the rollout not completed yet, oldest first."""
        return [self._command(r) for r in
                self._read("SELECT * FROM commands WHERE rollout_id = ? AND done_at IS NULL ORDER BY id",
                           (rollout_id,))]

    def commands(self, rollout_id: Optional[int] = None) -> list[Command]:
        """Every command (of one rollout when given), oldest first."""
        sql, args = "SELECT * FROM commands", ()
        if rollout_id is not None:
            sql, args = sql + " WHERE rollout_id = ?", (rollout_id,)
        return [self._command(r) for r in self._read(sql + " ORDER BY id", args)]

    def complete_command(self, command_id: int, outcome: str, actor: str = "controller") -> None:
        """Mark a command done with its outcome (audited as 'command_done'); only once."""

        def run(db: Tx) -> None:
            r = db.execute("SELECT c.*, r.candidate FROM commands c JOIN rollouts r ON r.id = c.rollout_id "
                           "WHERE c.id = ?", (command_id,)).fetchone()
            if r is None:
                raise RegistryError(f"unknown command {command_id}")
            if r["done_at"] is not None:
                raise RegistryError(f"command {command_id} is already done ({r['outcome']})")
            db.execute("UPDATE commands SET done_at = ?, outcome = ? WHERE id = ?", (time.time(), outcome, command_id))
            self._audit_in(db, actor, "command_done", r["candidate"], outcome, None, None,
                           {"command": r["command"], "command_id": command_id, "rollout_id": r["rollout_id"]})

        self._write(run)

    # --- leases: one controller per rollout --------------------------------------------------

    @staticmethod
    def _lease(r: Any) -> Lease:
        return Lease(r["rollout_id"], r["holder"], r["acquired_at"], r["heartbeat_at"], r["expires_at"])

    def lease(self, rollout_id: int) -> Optional[Lease]:
        """The lease row of a rollout (possibly expired), or None when nobody ever held it."""
        rows = self._read("SELECT * FROM leases WHERE rollout_id = ?", (rollout_id,))
        return self._lease(rows[0]) if rows else None

    def acquire_lease(self, rollout_id: int, holder: str, ttl_s: float, now: Optional[float] = None) -> Lease:
        """Take the rollout's lease for `holder` for `ttl_s` seconds, in one transaction.

        Granted when nobody holds it, when its holder's lease expired (audited as
        'lease_taken_over', naming the previous holder), or when `holder` holds it already
        (a renewal). Raises LeaseHeld naming the live holder otherwise."""
        if ttl_s <= 0:
            raise RegistryError(f"lease ttl must be > 0 s, got {ttl_s}")

        def run(db: Tx) -> Lease:
            t = time.time() if now is None else now
            r = db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            if r is None:
                raise RegistryError(f"unknown rollout {rollout_id}")
            row = db.execute("SELECT * FROM leases WHERE rollout_id = ?", (rollout_id,)).fetchone()
            if row is not None and row["holder"] != holder and row["expires_at"] > t:
                raise LeaseHeld(f"rollout {rollout_id} of {r['candidate']!r} is driven by controller "
                                f"{row['holder']!r} (lease renewed {t - row['heartbeat_at']:.1f} s ago, expires in "
                                f"{row['expires_at'] - t:.1f} s); one controller per rollout: stop that one, or "
                                f"wait for its lease to expire")
            if row is not None and row["holder"] == holder:
                db.execute("UPDATE leases SET heartbeat_at = ?, expires_at = ? WHERE rollout_id = ?",
                           (t, t + ttl_s, rollout_id))
            else:
                db.execute("INSERT INTO leases (rollout_id, holder, acquired_at, heartbeat_at, expires_at) "
                           "VALUES (?, ?, ?, ?, ?) ON CONFLICT (rollout_id) DO UPDATE SET holder = excluded.holder, "
                           "acquired_at = excluded.acquired_at, heartbeat_at = excluded.heartbeat_at, "
                           "expires_at = excluded.expires_at", (rollout_id, holder, t, t, t + ttl_s))
                action = "lease_taken_over" if row is not None else "lease_acquired"
                why = (f"previous holder {row['holder']!r} expired {t - row['expires_at']:.1f} s ago"
                       if row is not None else "first controller of this rollout")
                self._audit_in(db, holder, action, r["candidate"], why, None, None,
                               {"rollout_id": rollout_id, "holder": holder,
                                "previous_holder": row["holder"] if row is not None else None})
            return self._lease(db.execute("SELECT * FROM leases WHERE rollout_id = ?", (rollout_id,)).fetchone())

        return self._write(run)

    def release_lease(self, rollout_id: int, holder: str) -> bool:
        """Give the lease up (a clean exit); True when `holder` held it."""

        def run(db: Tx) -> bool:
            cur = db.execute("DELETE FROM leases WHERE rollout_id = ? AND holder = ?", (rollout_id, holder))
            return cur.rowcount > 0

        return self._write(run)

    # --- audit log -------------------------------------------------------------------------

    def audit(self, actor: str, action: str, subject: str, reason: str = "", from_state: Optional[str] = None,
              to_state: Optional[str] = None, data: Optional[dict] = None) -> Event:
        """Append one event to the audit log."""
        return self._write(lambda db: self._audit_in(db, actor, action, subject, reason, from_state, to_state, data))

    def audit_change(self, actor: str, action: str, subject: str, to_state: Optional[str] = None,
                     among: Sequence[str] = (), reason: Optional[str] = None,
                     data: Optional[dict] = None) -> Optional[Event]:
        """Append (`action`, `to_state`) for `subject` unless it is what the newest of its
        events among the actions `among` (default: `action` alone) already says; None when
        nothing changed. The check and the append are one transaction, so processes that
        record the same change at once record it once. `from_state` is that newest event's
        `to_state`; `reason` defaults to "<from or new> -> <to>"."""
        kinds = tuple(among) or (action,)

        def run(db: Tx) -> Optional[Event]:
            last = db.execute("SELECT action, to_state FROM events WHERE subject = ? AND action IN ("
                              + ", ".join("?" * len(kinds)) + ") ORDER BY id DESC LIMIT 1",
                              (subject, *kinds)).fetchone()
            if last is not None and (last["action"], last["to_state"]) == (action, to_state):
                return None
            before = last["to_state"] if last is not None else None
            why = reason if reason is not None else f"{before or 'new'} -> {to_state}"
            return self._audit_in(db, actor, action, subject, why, before, to_state, data)

        return self._write(run)

    def events(self, subject: Optional[str] = None, limit: Optional[int] = None,
               actions: Optional[Sequence[str]] = None) -> list[Event]:
        """Audit events (of `subject`, of the given `actions`), oldest first; with `limit`,
        the newest `limit` of them."""
        where, args = [], ()
        if subject is not None:
            where, args = where + ["subject = ?"], args + (subject,)
        if actions is not None:
            if not actions:
                return []
            where.append("action IN (" + ", ".join("?" * len(actions)) + ")")
            args += tuple(actions)
        sql = "SELECT * FROM events" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC"
        if limit is not None:
            sql, args = sql + " LIMIT ?", args + (int(limit),)
        return [self._event(r) for r in self._read(sql, args)][::-1]


def open_registry(cfg: Any, readonly: bool = False) -> Registry:
    """The registry of a run config: `registry.url` (PostgreSQL) when set, else the SQLite
    file `run_dir/registry.sqlite`."""
    from orchestrator.rundir import registry_location

    return Registry(registry_location(cfg), readonly=readonly, password_env=cfg.registry.password_env)
