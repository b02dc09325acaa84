"""The rollout controller: shadow -> canary steps -> promoted, or -> rolled back.

Each tick (every `rollout.tick_seconds`) runs these phases in order, each a method that
returns what the next needs:
0. hold the rollout's lease (one controller per rollout): take it, renew it, or stop
   naming the holder when another controller has it;
1. apply the operator commands queued in the registry (pause, freeze, resume, promote
   [--force], rollback), oldest first;
2. reconcile the router with the persisted state (weights, shadows, production): only
   when they differ, so it is idempotent and heals a crash between a persisted
   transition and its router update, or a router that restarted;
3. read the metric source, build the Observation (total since the rollout started,
   step since the step started; counter resets handled by `sources.advance`), call the
   pure `decision.decide` (`decision.guard_decision` while guarding after promotion).
   Paused: the rule still runs and only a rollback is acted on; frozen: this phase and
   the next are skipped;
4. on promote/rollback: FIRST persist the transition (compare-and-set on (state, step)),
   THEN move the router.

Crash safety: the registry is the only truth. A transition is one transaction that
checks the (state, step) the decision was made on; the router is set after it, from the
persisted record, and re-set by reconciliation at every tick. So a controller killed at
any point and started again finds the persisted step, moves the router to match, and
decides the next transition from there: no step is repeated (the CAS refuses a second
move from the same (state, step)) or skipped (each move is one step from the persisted
one), and promotion happens once (a final state refuses every transition). Commands are
made idempotent the same way: the transition a command causes stores the command id in
the rollout's data, so a command whose transition committed but whose completion did not
is only completed on restart, never applied twice.

A source error is inconclusive (never a rollback); after `rollout.max_source_errors` in a
row the rollout is paused, with an audit event. A router that cannot be reconciled (down,
or restarted without the candidate attached) is counted the same way: audited, and paused
after `rollout.max_source_errors` failed ticks in a row; a generation the restarted
router lost is attached again when the controller was given `attach`. A tick that raises
is caught, counted (graceful_controller_tick_errors_total), logged, and the loop goes on.
A controller that cannot act at all (the router refuses its admin token, another holds
the lease) says why once and stops (`Controller.stopped`).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Protocol, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from orchestrator.config import RunConfig
from orchestrator.registry import (FINAL_STATES, HELD_STATES, LeaseHeld, LeaseLost, Registry, RolloutRecord,
                                   RolloutState, StaleTransition)
import orchestrator.rollout.metric_names as metric_names
from orchestrator.rollout.decision import Counts, Decision, Observation, decide, guard_decision
from orchestrator.rollout.http import serve_http
from orchestrator.rollout.plan import ReconcileError, desired_traffic, next_position, traffic_matches
from orchestrator.rollout.sources import (MetricSource, SourceError, add, advance, counts_from_dict, counts_to_dict,
                                         read_source)
from serving.client import RouterError

log = logging.getLogger("graceful.controller")

CONTROLLER = "controller"
# Outcomes of commands that moved the rollout (checked against what the registry shows).
_MOVES = ("paused", "frozen", "resumed", "rolled back", "promoted")


class TrafficRouter(Protocol):
    """What the controller needs of the router (serving.client.RouterClient is one)."""

    def status(self) -> dict: ...

    def set_traffic(self, weights: dict[str, float], shadows: Optional[Sequence[str]] = None,
                    production: Optional[str] = None) -> dict: ...


class ControllerStopped(RuntimeError):
    """This controller cannot act at all (another holds the lease, the router refuses its
    token): it says why once and stops, instead of failing every tick."""


def default_holder() -> str:
    """A lease holder id unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class TickResult:
    """What one tick saw and did."""

    rollout_id: Optional[int] = None
    candidate: Optional[str] = None
    state: Optional[str] = None
    step: Optional[int] = None
    weight: Optional[float] = None
    decision: Optional[str] = None          # promote, hold, rollback, inconclusive, error; None: no decision
    reason: str = ""
    stats: dict = field(default_factory=dict)
    transition: Optional[str] = None        # "from -> to" when the tick moved the rollout
    commands: list[str] = field(default_factory=list)   # "pause #3: paused" ...
    router_changed: bool = False
    at: float = 0.0

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def as_dict(self) -> dict:
        return {**asdict(self), "final": self.final}


# --- metrics ---------------------------------------------------------------------------------

class ControllerMetrics:
    """The metrics of orchestrator/rollout/metric_names.py on a private CollectorRegistry."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry()
        self.m: dict[str, Any] = {}
        for name, (kind, labels, doc) in metric_names.DEFINED.items():
            cls = Counter if kind == "counter" else Gauge
            self.m[name] = cls(name, doc, labelnames=labels, registry=self.registry)

    def export_rollout(self, r: RolloutRecord) -> None:
        for s in metric_names.STATES:
            self.m["graceful_rollout_state"].labels(r.candidate, s).set(1.0 if s == r.state else 0.0)
        self.m["graceful_rollout_step"].labels(r.candidate).set(r.step)
        self.m["graceful_rollout_candidate_weight"].labels(r.candidate).set(r.weight)

    def decision(self, candidate: str, kind: str) -> None:
        self.m["graceful_rollout_decisions"].labels(candidate, kind).inc()

    def rollback(self, candidate: str, actor: str) -> None:
        self.m["graceful_rollout_rollbacks"].labels(candidate, actor).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)


# --- the controller --------------------------------------------------------------------------

@dataclass
class _Evidence:
    """In-memory view of one step's evidence; rebuilt from the rollout's data on restart."""

    key: tuple                       # (rollout id, step, step_started_at)
    total_base: Counts               # evidence from the rollout start to the step start
    last_raw: Optional[Counts]       # the last raw cumulative snapshot of the source
    step_acc: Counts                 # evidence since the step started (resets handled)


class Controller:
    """Drives the active rollout (or the one `rollout_id` names) one tick at a time.

    `router_client`: serving.client.RouterClient (status, set_traffic); `source`: a
    sources.MetricSource. `clock` returns unix seconds (tests pass their own).
    """

    def __init__(self, cfg: RunConfig, registry: Registry, router_client: TrafficRouter, source: MetricSource, *,
                 rollout_id: Optional[int] = None, candidate: Optional[str] = None,
                 clock: Callable[[], float] = time.time, metrics: Optional[ControllerMetrics] = None,
                 holder: Optional[str] = None, attach: Optional[Callable[[str], None]] = None):
        self.cfg = cfg
        # One controller per rollout: `holder` names this one in the rollout's lease.
        self.holder = holder or default_holder()
        self.attach = attach                # deploys and attaches a generation the router lost
        self.stopped: Optional[str] = None  # why this controller gave up (it says so once)
        self.policy = cfg.rollout
        self.registry = registry
        self.router = router_client
        self.source = source
        self.rollout_id = rollout_id
        self.candidate = candidate
        self.clock = clock
        self.metrics = metrics or ControllerMetrics()
        self.source_errors = 0              # consecutive
        self.router_errors = 0              # consecutive failed reconciles
        self.last: Optional[TickResult] = None
        self._source_error = ""
        self._router_error: Optional[Exception] = None
        self._ev: Optional[_Evidence] = None
        self._last_kind: dict[int, str] = {}
        self._http: Optional[Any] = None
        self._lock = threading.Lock()       # one tick at a time (run loop vs a test's tick)

    # --- which rollout -----------------------------------------------------------------------

    def current(self) -> Optional[RolloutRecord]:
        """The rollout this controller drives: pinned by id once seen, so that it keeps
        reporting the final state after the rollout finished."""
        if self.rollout_id is not None:
            return self.registry.rollout(self.rollout_id)
        r = self.registry.active_rollout()
        if r is None or (self.candidate is not None and r.candidate != self.candidate):
            return None
        self.rollout_id = r.id
        return r

    # --- router ------------------------------------------------------------------------------

    def reconcile(self, r: Optional[RolloutRecord] = None) -> bool:
        """Make the router's plan match the persisted rollout; True when it had to change it.

        Idempotent: reads the router's plan and posts only a difference. A finished rollout
        is enforced only while it is the latest one (a newer rollout owns the router).
        """
        r = r or self.current()
        if r is None:
            return False
        if r.state in FINAL_STATES:
            latest = self.registry.latest_rollout()
            if latest is not None and latest.id != r.id:
                return False
        current = self.router.status()
        missing = [g for g in (r.candidate, r.baseline) if g not in current.get("weights", {})]
        if missing and self.attach is not None and not r.state.final:
            for g in missing:  # a router restarted without it: bring it back
                log.warning("router lost %s; attaching it again", g)
                self.attach(g)
            current = self.router.status()
        want = desired_traffic(r, current)
        if traffic_matches(want, current):
            return False
        self.router.set_traffic(want["weights"], shadows=want["shadows"], production=want["production"])
        log.info("router set to %s (rollout %d %s step %d)", want, r.id, r.state, r.step)
        return True

    # --- evidence ----------------------------------------------------------------------------

    def _evidence(self, r: RolloutRecord) -> _Evidence:
        key = (r.id, r.step, r.step_started_at)
        if self._ev is None or self._ev.key != key:
            self._ev = _Evidence(key, counts_from_dict(r.data.get("total_at_step_start")) or Counts(),
                                 counts_from_dict(r.data.get("raw_at_step_start")), Counts())
        return self._ev

    def observe(self, r: RolloutRecord, now: float) -> Optional[Observation]:
        """Read the source and fold it into the step's evidence; None when the source failed."""
        ev = self._evidence(r)
        try:
            raw = read_source(self.source, r.candidate, r.baseline)
        except SourceError as e:
            self.source_errors += 1
            self.metrics.m["graceful_controller_metric_source_errors"].labels(self.source.name).inc()
            log.warning("metric source %s: %s (%d in a row)", self.source.name, e, self.source_errors)
            self._source_error = str(e)
            return None
        self.source_errors = 0
        delta = advance(ev.last_raw, raw)
        ev.step_acc = add(ev.step_acc, delta, raw.latency_p99_ms)
        ev.last_raw = raw
        total = add(ev.total_base, ev.step_acc, raw.latency_p99_ms)
        return Observation(total=total, step=ev.step_acc, step_elapsed_s=max(0.0, now - r.step_started_at))

    def _step_data(self, r: RolloutRecord, **extra: Any) -> dict:
        """The data a new step starts from: the evidence so far and the raw snapshot now."""
        ev = self._evidence(r)
        total = add(ev.total_base, ev.step_acc)
        return {**{k: v for k, v in r.data.items() if k not in ("last_command",)},
                "total_at_step_start": counts_to_dict(total),
                "raw_at_step_start": counts_to_dict(ev.last_raw) if ev.last_raw is not None else None,
                **extra}

    # --- transitions -------------------------------------------------------------------------

    def _move(self, r: RolloutRecord, state: str, step: int, weight: float, actor: str, action: str,
              reason: str, data: Optional[dict], now: float) -> RolloutRecord:
        """Persist (compare-and-set on r's (state, step), fenced by this controller's
        lease), THEN set the router. A move somebody else made first returns the rollout as
        it is; a lost lease stops this controller."""
        try:
            new = self.registry.transition(r.id, (r.state, r.step), state=state, step=step, weight=weight,
                                           actor=actor, action=action, reason=reason, data=data,
                                           step_started_at=now if self._new_step(r, state, step) else None,
                                           holder=self.holder, now=now)
        except LeaseLost as e:
            raise ControllerStopped(str(e)) from None
        except StaleTransition as e:
            log.warning("transition refused, somebody moved rollout %d first: %s", r.id, e)
            return self.registry.rollout(r.id)
        log.info("rollout %d %s: %s step %d -> %s step %d (%s)", r.id, action, r.state, r.step, state, step, reason)
        self.metrics.export_rollout(new)
        if state == RolloutState.ROLLED_BACK:
            self.metrics.rollback(r.candidate, "alert" if actor == "alert" else
                                  CONTROLLER if actor == CONTROLLER else "operator")
        try:
            self.reconcile(new)
        except Exception as e:  # persisted already: the next tick's reconcile heals the router
            stop = self._refused(e)
            if stop is not None:
                raise stop from None
            self._router_error = e
            log.error("router update after %s failed (the next tick retries): %s", action, e)
        return new

    def _refused(self, e: Exception) -> Optional[ControllerStopped]:
        """The stop a router error means, when it refused this controller's admin token."""
        if isinstance(e, RouterError) and e.status in (401, 403):
            return ControllerStopped(
                f"the router refused the admin token (HTTP {e.status}): this controller uses the token from "
                f"serving.admin_token or ${self.cfg.serving.admin_token_env}; give it the token the router "
                f"was started with")
        return None

    @staticmethod
    def _new_step(r: RolloutRecord, state: str, step: int) -> bool:
        """A move that starts a new evidence window (not a pause, resume or final move)."""
        if state == RolloutState.GUARDING:
            return r.position != RolloutState.GUARDING
        return state == RolloutState.CANARY and (step != r.step or r.state == RolloutState.SHADOW)

    def _apply_command(self, r: RolloutRecord, cmd: Any, now: float) -> tuple[RolloutRecord, str]:
        """Apply one operator command; returns the rollout after it and the outcome line
        (a move somebody made first is reported as not applied, never as done)."""
        r2, outcome = self._command_move(r, cmd, now)
        # Every move a command makes stores its id in the rollout's data: without it, the
        # compare-and-set refused the move (somebody moved the rollout first).
        if outcome.startswith(_MOVES) and r2.data.get("last_command") != cmd.id:
            return r2, f"not applied: the rollout was moved first (now {r2.state} step {r2.step})"
        return r2, outcome

    def _command_move(self, r: RolloutRecord, cmd: Any, now: float) -> tuple[RolloutRecord, str]:
        if r.data.get("last_command") == cmd.id:
            return r, f"{cmd.command}: applied before a restart"  # transition committed, completion did not
        tag = {"last_command": cmd.id}
        who, why = cmd.actor, cmd.reason or cmd.command
        if r.state in FINAL_STATES:
            return r, f"ignored: rollout already {r.state}"
        if cmd.command in ("pause", "freeze"):
            held = RolloutState.PAUSED if cmd.command == "pause" else RolloutState.FROZEN
            if r.state == held:
                return r, f"ignored: already {held}"
            r = self._move(r, held, r.step, r.weight, who, cmd.command, why, {**r.data, **tag}, now)
            return r, f"{held} at {r.paused_from} step {r.step}"
        if cmd.command == "resume":
            if r.state not in HELD_STATES:
                return r, f"ignored: not paused or frozen ({r.state})"
            r = self._move(r, r.paused_from or RolloutState.SHADOW, r.step, r.weight, who, "resume", why, {**r.data, **tag}, now)
            return r, f"resumed {r.state} step {r.step}"
        if cmd.command == "rollback" and cmd.actor == "alert" and r.state == RolloutState.FROZEN:
            return r, "ignored: frozen, nothing automatic until resume (an operator's rollback still applies)"
        if cmd.command == "rollback":
            r = self._move(r, RolloutState.ROLLED_BACK, r.step, 0.0, who, "rollback", why, {**r.data, **tag}, now)
            return r, "rolled back"
        if cmd.command == "promote":
            if cmd.force:
                r = self._move(r, RolloutState.PROMOTED, len(self.policy.steps), 1.0, who, "force_promote", why,
                               self._step_data(r, **tag), now)
                return r, "promoted (forced: rule skipped)"
            if r.state in HELD_STATES:
                return r, f"refused: {r.state}; resume first (or promote --force)"
            if r.state == RolloutState.GUARDING:
                return r, ("refused: guarding; the guard passes on its labels or seconds "
                           "(promote --force ends it now)")
            # Without --force a promote skips the rest of the bake time, never the evidence:
            # the rule must say promote as if the bake were done.
            obs = self.observe(r, now)
            if obs is None:
                return r, "refused: metric source down, no evidence (promote --force skips the rule)"
            obs = replace(obs, step_elapsed_s=math.inf)
            d = self._rule(r, obs)
            if d.kind != "promote":
                return r, f"refused: the rule says {d.kind}: {d.reason} (promote --force skips the rule)"
            state, step, weight = self._next(r)
            r = self._move(r, state, step, weight, who, "promote", f"{why} (rule: {d.reason})",
                           self._step_data(r, **tag), now)
            return r, f"promoted to {state} step {step}"
        return r, f"ignored: unknown command {cmd.command!r}"

    def _next(self, r: RolloutRecord) -> tuple[RolloutState, int, float]:
        return next_position(r, len(self.policy.steps), [s.weight for s in self.policy.steps],
                             guard=self.policy.guard.enabled)

    def _rule(self, r: RolloutRecord, obs: Optional[Observation]) -> Decision:
        """decide() for the step, or the guard's rule after promotion."""
        if r.position == RolloutState.GUARDING:
            return guard_decision(obs, self.policy)
        return decide(obs, self._step_spec(r), self.policy)

    def _step_spec(self, r: RolloutRecord):
        if r.position == RolloutState.SHADOW or r.step < 1:
            return None
        return self.policy.steps[min(r.step, len(self.policy.steps)) - 1]

    # --- one tick ----------------------------------------------------------------------------

    def tick(self) -> TickResult:
        """One tick; never raises. A failure is counted, logged and reported as 'error'; a
        controller that cannot act at all (lease lost, admin token refused) sets `stopped`
        with the reason, says it once, and `run` ends."""
        with self._lock:
            now = self.clock()
            try:
                result = self._tick(now)
            except ControllerStopped as e:
                if self.stopped is None:
                    log.error("controller %s stops: %s", self.holder, e)
                self.stopped = str(e)
                r = self._current_or_none()
                result = self._result_for(r, now, reason=f"controller stopped: {e}")
            except Exception as e:
                self.metrics.m["graceful_controller_tick_errors"].inc()
                log.exception("controller tick failed (the loop goes on)")
                r = self._current_or_none()
                result = self._result_for(r, now, decision="error", reason=f"tick failed: {type(e).__name__}: {e}")
                if r is not None:
                    self.metrics.decision(r.candidate, "error")
            else:
                self.metrics.m["graceful_controller_last_tick_timestamp_seconds"].set(now)
            self.last = result
            return result

    def _current_or_none(self) -> Optional[RolloutRecord]:
        try:
            return self.current()
        except Exception:
            return None

    @staticmethod
    def _result_for(r: Optional[RolloutRecord], now: float, decision: Optional[str] = None,
                    reason: str = "") -> TickResult:
        return TickResult(rollout_id=r and r.id, candidate=r and r.candidate, state=r and r.state,
                          step=r and r.step, weight=r and r.weight, decision=decision, reason=reason, at=now)

    def _tick(self, now: float) -> TickResult:
        """The phases of a tick, in order; each returns what the next one needs."""
        self._router_error = None
        self._source_error = ""
        r = self.current()
        if r is None:
            return TickResult(reason="no active rollout", at=now)
        if not r.state.final:
            self.hold_lease(r, now)                                  # 0. only the lease holder acts
        res = TickResult(rollout_id=r.id, candidate=r.candidate, at=now)
        r, res.commands, moved = self._commands_phase(r, now)       # 1. operator commands
        res.router_changed = self._router_phase(r, now)              # 2. the router follows the registry
        decision: Optional[Decision] = None
        if moved:
            res.transition = "by command"  # the new position is decided on from the next tick
        elif not r.state.final and r.state != RolloutState.FROZEN:
            r, decision, res.transition = self._decide_phase(r, now)  # 3. observe, decide; 4. act
        return self._report_phase(res, r, decision)

    def _commands_phase(self, r: RolloutRecord, now: float) -> tuple[RolloutRecord, list[str], bool]:
        """Apply the queued operator commands, oldest first: (rollout after them, outcome
        lines, whether they moved it)."""
        lines, moved = [], False
        for cmd in self.registry.pending_commands(r.id):
            before = (r.state, r.step)
            r, outcome = self._apply_command(r, cmd, now)
            moved |= (r.state, r.step) != before
            self.registry.complete_command(cmd.id, outcome, actor=CONTROLLER)
            lines.append(f"{cmd.command}{' --force' if cmd.force else ''} #{cmd.id} by {cmd.actor}: {outcome}")
        return r, lines, moved

    def _router_phase(self, r: RolloutRecord, now: float) -> bool:
        """Reconcile the router with the persisted rollout; True when it changed it."""
        if self._router_error is not None:
            return False  # a command's move already failed to reach it: reported at the end
        try:
            changed = self.reconcile(r)
        except Exception as e:
            stop = self._refused(e)
            if stop is not None:
                raise stop from None
            self._router_failed(r, e, now)
            raise
        self.router_errors = 0
        self.metrics.export_rollout(r)
        return changed

    def _decide_phase(self, r: RolloutRecord, now: float) -> tuple[RolloutRecord, Decision, Optional[str]]:
        """Observe, decide (`decision.decide`), then act: persist first, then the router.
        Returns (rollout after, the decision, "from -> to" when it moved)."""
        obs = self.observe(r, now)
        decision = self._rule(r, obs)
        if r.state == RolloutState.PAUSED and decision.kind == "promote":
            # paused: no promotion; automatic rollback stays on (freeze stops that too)
            decision = Decision("hold", f"paused: the rule would promote ({decision.reason}); resume to go on",
                                decision.stats)
        if obs is None and self._source_error:
            decision = Decision(decision.kind, f"{decision.reason}: {self._source_error}", decision.stats)
        self.metrics.decision(r.candidate, decision.kind)
        if "live_nfr" in decision.stats:
            self.metrics.m["graceful_rollout_live_nfr"].labels(r.candidate).set(decision.stats["live_nfr"])
        if self._last_kind.get(r.id) != decision.kind or decision.kind in ("promote", "rollback"):
            # Holds are not logged one by one; a change of kind and every move are, with
            # the evidence (counts, statistics and boundaries) behind them.
            self.registry.audit(CONTROLLER, "decision", r.candidate, decision.reason,
                                data={"rollout_id": r.id, "step": r.step, "decision": decision.kind,
                                      "evidence": dict(decision.stats)})
            self._last_kind[r.id] = decision.kind
        before = (r.state, r.step)
        if decision.kind == "promote":
            state, step, weight = self._next(r)
            r = self._move(r, state, step, weight, CONTROLLER,
                           {RolloutState.PROMOTED: "promote", RolloutState.GUARDING: "guard"}.get(state, "advance"),
                           decision.reason, self._step_data(r), now)
        elif decision.kind == "rollback":
            r = self._move(r, RolloutState.ROLLED_BACK, r.step, 0.0, CONTROLLER, "rollback", decision.reason,
                           self._step_data(r), now)
        elif obs is None and self.source_errors >= self.policy.max_source_errors and r.state not in HELD_STATES:
            reason = (f"metric source {self.source.name} failed {self.source_errors} times in a row: "
                      f"{self._source_error}")
            r = self._move(r, RolloutState.PAUSED, r.step, r.weight, CONTROLLER, "pause", reason, None, now)
            self.source_errors = 0
        moved = f"{before[0]}/{before[1]} -> {r.state}/{r.step}" if (r.state, r.step) != before else None
        return r, decision, moved

    def _report_phase(self, res: TickResult, r: RolloutRecord, decision: Optional[Decision]) -> TickResult:
        res.state, res.step, res.weight = r.state, r.step, r.weight
        if decision is not None:
            res.decision, res.reason, res.stats = decision.kind, decision.reason, dict(decision.stats)
        elif r.state in HELD_STATES:
            res.reason = f"{r.state} (from {r.paused_from}); resume to go on"
        else:
            res.reason = f"rollout {r.state}"
        self.metrics.export_rollout(r)
        if r.state.final:
            self.release_lease(r)
        if self._router_error is not None:
            raise ReconcileError(f"router not updated: {self._router_error}")
        return res

    # --- the lease: one controller per rollout ----------------------------------------------

    def hold_lease(self, r: RolloutRecord, now: float) -> None:
        """Take or renew this controller's lease on rollout `r`; ControllerStopped when
        another controller holds it (or took it over after ours expired)."""
        try:
            self.registry.acquire_lease(r.id, self.holder, self.policy.lease_seconds, now=now)
        except LeaseHeld as e:
            raise ControllerStopped(str(e)) from None

    def release_lease(self, r: Optional[RolloutRecord] = None) -> None:
        r = r or self._current_or_none()
        if r is not None:
            try:
                self.registry.release_lease(r.id, self.holder)
            except Exception as e:  # it expires on its own
                log.warning("could not release the lease of rollout %d: %s", r.id, e)

    def _router_failed(self, r: RolloutRecord, e: Exception, now: float) -> None:
        """A reconcile that failed (router down, or it lost a generation: restarted without
        the candidate attached) counts like a source error: audited when the run of
        failures starts, and after rollout.max_source_errors in a row the rollout pauses
        (persisted; the router is left as it is) until an operator resumes it."""
        self.router_errors += 1
        why = f"{type(e).__name__}: {e}"
        log.warning("router reconcile failed (%d in a row): %s", self.router_errors, why)
        if self.router_errors == 1:
            self.registry.audit(CONTROLLER, "router_error", r.candidate, f"router not reconciled: {why}",
                                data={"rollout_id": r.id, "step": r.step})
        if self.router_errors >= self.policy.max_source_errors and r.state not in FINAL_STATES \
                and r.state not in HELD_STATES:
            reason = f"router not reconciled {self.router_errors} times in a row: {why}"
            self._move(r, RolloutState.PAUSED, r.step, r.weight, CONTROLLER, "pause", reason, None, now)
            self.router_errors = 0

    # --- loop --------------------------------------------------------------------------------

    def run(self, stop: threading.Event, on_tick: Optional[Callable[[TickResult], None]] = None,
            max_seconds: Optional[float] = None) -> Optional[TickResult]:
        """Tick every rollout.tick_seconds until the rollout is final, `stop` is set or
        `max_seconds` passed. Returns the last tick's result."""
        deadline = time.monotonic() + max_seconds if max_seconds else None
        while not stop.is_set():
            t0 = time.monotonic()
            res = self.tick()
            if on_tick is not None:
                on_tick(res)
            if res.final or self.stopped or (deadline is not None and time.monotonic() >= deadline):
                break
            stop.wait(max(0.0, self.policy.tick_seconds - (time.monotonic() - t0)))
        return self.last

    def serve_http(self, host: Optional[str] = None, port: Optional[int] = None) -> Optional[Any]:
        """Start the endpoint of `orchestrator.rollout.http` (rollout.metrics_host:metrics_port
        unless given) in a thread; None when the port is 0 (off). `stop_http` stops it."""
        self._http = serve_http(self, host or self.policy.metrics_host,
                                self.policy.metrics_port if port is None else port,
                                self.cfg.serving.resolved_admin_token())
        return self._http

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.stop()
            self._http = None
