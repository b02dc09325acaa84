"""The rollout controller: shadow -> canary steps -> promoted, or -> rolled back.

Each tick (every `rollout.tick_seconds`):
1. apply the operator commands queued in the registry (pause, resume, promote
   [--force], rollback), oldest first;
2. reconcile the router with the persisted state (weights, shadows, production): only
   when they differ, so it is idempotent and heals a crash between a persisted
   transition and its router update, or a router that restarted;
3. read the metric source, build the Observation (total since the rollout started,
   step since the step started; counter resets handled by `sources.advance`), call the
   pure `decision.decide`;
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
after `rollout.max_source_errors` failed ticks in a row. A tick that raises is caught,
counted (graceful_controller_tick_errors_total), logged, and the loop goes on.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from orchestrator.rollout import metric_names
from orchestrator.config import RunConfig
from orchestrator.rollout.decision import Counts, Decision, Observation, decide
from orchestrator.registry.store import FINAL_STATES, Registry, RolloutRecord, StaleTransition
from orchestrator.rollout.sources import SourceError, add, advance, counts_from_dict, counts_to_dict

log = logging.getLogger("graceful.controller")

CONTROLLER = "controller"


class ReconcileError(RuntimeError):
    """The router cannot be made to match the persisted rollout (e.g. a generation is not attached)."""


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


# --- pure helpers ----------------------------------------------------------------------------

def desired_traffic(r: RolloutRecord, current: dict) -> dict:
    """The router plan that matches persisted rollout `r`, given the router's current plan
    (`current`: the `/v1/status` answer; only production, weights, shadows are used).

    shadow: baseline serves everything, candidate shadowed; canary: candidate r.weight,
    baseline 1 - r.weight, candidate still shadowed (so production-served requests are
    compared too); paused: the plan of the state it paused; promoted: candidate is
    production at weight 1, neither shadowed; rolled back: baseline production at weight
    1, candidate no longer shadowed. Other generations keep weight 0 and their shadowing.
    """
    weights = {g: 0.0 for g in current.get("weights", {})}
    for g in (r.candidate, r.baseline):
        if g not in weights:
            raise ReconcileError(f"generation {g!r} is not attached to the router "
                                 f"(attached: {sorted(weights)}); serve it first")
    shadows = [s for s in current.get("shadows", []) if s not in (r.candidate, r.baseline)]
    state = r.paused_from if r.state == "paused" else r.state
    if state == "promoted":
        weights[r.candidate] = 1.0
        return {"weights": weights, "shadows": shadows, "production": r.candidate}
    if state == "rolled_back":
        weights[r.baseline] = 1.0
        return {"weights": weights, "shadows": shadows, "production": r.baseline}
    w = float(r.weight) if state == "canary" else 0.0
    weights[r.candidate] = w
    weights[r.baseline] = 1.0 - w
    return {"weights": weights, "shadows": shadows + [r.candidate], "production": r.baseline}


def traffic_matches(want: dict, current: dict) -> bool:
    """True when the router already runs plan `want` (weights within 1e-9, same shadow set)."""
    cw = current.get("weights", {})
    return (current.get("production") == want["production"]
            and set(current.get("shadows", [])) == set(want["shadows"])
            and set(cw) == set(want["weights"])
            and all(abs(float(cw[g]) - w) <= 1e-9 for g, w in want["weights"].items()))


def next_position(r: RolloutRecord, n_steps: int, weights: list[float]) -> tuple[str, int, float]:
    """(state, step, weight) one promotion after `r`: shadow -> canary 1 -> ... -> canary n ->
    promoted (step n, weight 1). `r` must be in shadow or canary."""
    if r.state == "shadow":
        return "canary", 1, weights[0]
    if r.state == "canary" and r.step < n_steps:
        return "canary", r.step + 1, weights[r.step]
    if r.state == "canary":
        return "promoted", r.step, 1.0
    raise ValueError(f"no next step from state {r.state!r}")


def start_rollout(registry: Registry, source: Any, candidate: str, baseline: str, actor: str,
                  reason: str) -> RolloutRecord:
    """Start a rollout whose evidence counts from now: the source's current snapshot is
    stored as the first step's base (None when the source is down: the first good read
    becomes the base)."""
    try:
        raw = counts_to_dict(source.read(candidate))
    except SourceError as e:
        log.warning("metric source down at rollout start (%s): evidence counts from its first read", e)
        raw = None
    return registry.start_rollout(candidate, baseline, actor, reason,
                                  data={"raw_at_step_start": raw, "total_at_step_start": counts_to_dict(Counts())})


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
    latency_breaches: int = 0        # consecutive ticks with p99 over the limit on fresh requests
    fresh_requests: int = 0          # candidate requests since the previous read


class Controller:
    """Drives the active rollout (or the one `rollout_id` names) one tick at a time.

    `router_client`: serving.client.RouterClient (status, set_traffic); `source`: a
    sources.MetricSource. `clock` returns unix seconds (tests pass their own).
    """

    def __init__(self, cfg: RunConfig, registry: Registry, router_client: Any, source: Any, *,
                 rollout_id: Optional[int] = None, candidate: Optional[str] = None,
                 clock: Callable[[], float] = time.time, metrics: Optional[ControllerMetrics] = None):
        self.cfg = cfg
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
        self._http: Optional[ControllerHTTP] = None
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
            raw = self.source.read(r.candidate)
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
        ev.fresh_requests = delta.requests
        total = add(ev.total_base, ev.step_acc, raw.latency_p99_ms)
        return Observation(total=total, step=ev.step_acc, step_elapsed_s=max(0.0, now - r.step_started_at),
                           # a tick without fresh requests cannot complete a run of breaches
                           latency_breaches=ev.latency_breaches if delta.requests > 0 else 0)

    def _count_latency(self, r: RolloutRecord, d: Decision) -> None:
        """Keep decide's latency-breach run: a breaching tick counts only when it saw fresh
        requests (the same p99 read twice is one piece of evidence); a tick within the
        limit ends the run."""
        ev = self._evidence(r)
        if not d.stats.get("latency_breach"):
            ev.latency_breaches = 0
        elif ev.fresh_requests > 0:
            ev.latency_breaches += 1

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
        """Persist (compare-and-set on r's (state, step)), THEN set the router."""
        try:
            new = self.registry.transition(r.id, (r.state, r.step), state=state, step=step, weight=weight,
                                           actor=actor, action=action, reason=reason, data=data,
                                           step_started_at=now if self._new_step(r, state, step) else None)
        except StaleTransition as e:
            log.warning("transition refused, somebody moved rollout %d first: %s", r.id, e)
            return self.registry.rollout(r.id)
        log.info("rollout %d %s: %s step %d -> %s step %d (%s)", r.id, action, r.state, r.step, state, step, reason)
        self.metrics.export_rollout(new)
        if state == "rolled_back":
            self.metrics.rollback(r.candidate, "alert" if actor == "alert" else
                                  CONTROLLER if actor == CONTROLLER else "operator")
        try:
            self.reconcile(new)
        except Exception as e:  # persisted already: the next tick's reconcile heals the router
            self._router_error = e
            log.error("router update after %s failed (the next tick retries): %s", action, e)
        return new

    @staticmethod
    def _new_step(r: RolloutRecord, state: str, step: int) -> bool:
        """A move that starts a new evidence window (not a pause, resume or final move)."""
        return state == "canary" and (step != r.step or r.state == "shadow")

    def _apply_command(self, r: RolloutRecord, cmd: Any, now: float) -> tuple[RolloutRecord, str]:
        """Apply one operator command; returns the rollout after it and the outcome line."""
        if r.data.get("last_command") == cmd.id:
            return r, f"{cmd.command}: applied before a restart"  # transition committed, completion did not
        tag = {"last_command": cmd.id}
        who, why = cmd.actor, cmd.reason or cmd.command
        if r.state in FINAL_STATES:
            return r, f"ignored: rollout already {r.state}"
        if cmd.command == "pause":
            if r.state == "paused":
                return r, "ignored: already paused"
            r = self._move(r, "paused", r.step, r.weight, who, "pause", why, {**r.data, **tag}, now)
            return r, f"paused at {r.paused_from} step {r.step}"
        if cmd.command == "resume":
            if r.state != "paused":
                return r, f"ignored: not paused ({r.state})"
            r = self._move(r, r.paused_from or "shadow", r.step, r.weight, who, "resume", why, {**r.data, **tag}, now)
            return r, f"resumed {r.state} step {r.step}"
        if cmd.command == "rollback":
            r = self._move(r, "rolled_back", r.step, 0.0, who, "rollback", why, {**r.data, **tag}, now)
            return r, "rolled back"
        if cmd.command == "promote":
            if cmd.force:
                r = self._move(r, "promoted", len(self.policy.steps), 1.0, who, "force_promote", why,
                               self._step_data(r, **tag), now)
                return r, "promoted (forced: rule skipped)"
            if r.state == "paused":
                return r, "refused: paused; resume first (or promote --force)"
            # Without --force a promote skips the rest of the bake time, never the evidence:
            # the rule must say promote as if the bake were done.
            obs = self.observe(r, now)
            if obs is None:
                return r, "refused: metric source down, no evidence (promote --force skips the rule)"
            obs = replace(obs, step_elapsed_s=math.inf)
            d = decide(obs, self._step_spec(r), self.policy)
            self._count_latency(r, d)
            if d.kind != "promote":
                return r, f"refused: the rule says {d.kind}: {d.reason} (promote --force skips the rule)"
            state, step, weight = next_position(r, len(self.policy.steps), self._weights())
            r = self._move(r, state, step, weight, who, "promote", f"{why} (rule: {d.reason})",
                           self._step_data(r, **tag), now)
            return r, f"promoted to {state} step {step}"
        return r, f"ignored: unknown command {cmd.command!r}"

    def _weights(self) -> list[float]:
        return [s.weight for s in self.policy.steps]

    def _step_spec(self, r: RolloutRecord):
        state = r.paused_from if r.state == "paused" else r.state
        if state == "shadow" or r.step < 1:
            return None
        return self.policy.steps[min(r.step, len(self.policy.steps)) - 1]

    # --- one tick ----------------------------------------------------------------------------

    def tick(self) -> TickResult:
        """One tick; never raises (a failure is counted, logged and reported as 'error')."""
        with self._lock:
            now = self.clock()
            try:
                result = self._tick(now)
            except Exception as e:
                self.metrics.m["graceful_controller_tick_errors"].inc()
                log.exception("controller tick failed (the loop goes on)")
                r = None
                try:
                    r = self.current()
                except Exception:
                    pass
                result = TickResult(rollout_id=r and r.id, candidate=r and r.candidate, state=r and r.state,
                                    step=r and r.step, weight=r and r.weight, decision="error",
                                    reason=f"tick failed: {type(e).__name__}: {e}", at=now)
                if r is not None:
                    self.metrics.decision(r.candidate, "error")
            else:
                self.metrics.m["graceful_controller_last_tick_timestamp_seconds"].set(now)
            self.last = result
            return result

    def _tick(self, now: float) -> TickResult:
        self._router_error = None
        self._source_error = ""
        r = self.current()
        if r is None:
            return TickResult(reason="no active rollout", at=now)
        res = TickResult(rollout_id=r.id, candidate=r.candidate, at=now)
        # 1. operator commands, oldest first
        moved_by_command = False
        for cmd in self.registry.pending_commands(r.id):
            before = (r.state, r.step)
            r, outcome = self._apply_command(r, cmd, now)
            moved_by_command |= (r.state, r.step) != before
            self.registry.complete_command(cmd.id, outcome, actor=CONTROLLER)
            res.commands.append(f"{cmd.command}{' --force' if cmd.force else ''} #{cmd.id} by {cmd.actor}: {outcome}")
        # 2. the router follows the registry
        if self._router_error is None:
            try:
                res.router_changed = self.reconcile(r)
            except Exception as e:
                self._router_failed(r, e, now)
                raise
            self.router_errors = 0
        self.metrics.export_rollout(r)
        decision: Optional[Decision] = None
        if moved_by_command:
            res.transition = "by command"
        elif r.state not in FINAL_STATES and r.state != "paused":
            # 3. observe and decide (not in a tick an operator moved the rollout: the new
            # position is decided on from the next tick)
            obs = self.observe(r, now)
            decision = decide(obs, self._step_spec(r), self.policy)
            if obs is not None:
                self._count_latency(r, decision)
            if obs is None and self._source_error:
                decision = Decision(decision.kind, f"{decision.reason}: {self._source_error}", decision.stats)
            self.metrics.decision(r.candidate, decision.kind)
            if "live_nfr" in decision.stats:
                self.metrics.m["graceful_rollout_live_nfr"].labels(r.candidate).set(decision.stats["live_nfr"])
            if self._last_kind.get(r.id) != decision.kind:
                # Holds are not logged one by one; a change of kind is (with its numbers).
                self.registry.audit(CONTROLLER, "decision", r.candidate, decision.reason,
                                    data={"rollout_id": r.id, "step": r.step, "decision": decision.kind})
                self._last_kind[r.id] = decision.kind
            # 4. act: persist first, then the router
            before = (r.state, r.step)
            if decision.kind == "promote":
                state, step, weight = next_position(r, len(self.policy.steps), self._weights())
                r = self._move(r, state, step, weight, CONTROLLER, "promote" if state == "promoted" else "advance",
                               decision.reason, self._step_data(r), now)
            elif decision.kind == "rollback":
                r = self._move(r, "rolled_back", r.step, 0.0, CONTROLLER, "rollback", decision.reason,
                               self._step_data(r), now)
            elif obs is None and self.source_errors >= self.policy.max_source_errors:
                reason = (f"metric source {self.source.name} failed {self.source_errors} times in a row: "
                          f"{self._source_error}")
                r = self._move(r, "paused", r.step, r.weight, CONTROLLER, "pause", reason, None, now)
                self.source_errors = 0
            if (r.state, r.step) != before:
                res.transition = f"{before[0]}/{before[1]} -> {r.state}/{r.step}"
        res.state, res.step, res.weight = r.state, r.step, r.weight
        if decision is not None:
            res.decision, res.reason, res.stats = decision.kind, decision.reason, dict(decision.stats)
        elif r.state == "paused":
            res.reason = f"paused (from {r.paused_from}); resume to go on"
        else:
            res.reason = f"rollout {r.state}"
        self.metrics.export_rollout(r)
        if self._router_error is not None:
            raise ReconcileError(f"router not updated: {self._router_error}")
        return res

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
                and r.state != "paused":
            reason = f"router not reconciled {self.router_errors} times in a row: {why}"
            self._move(r, "paused", r.step, r.weight, CONTROLLER, "pause", reason, None, now)
            self.router_errors = 0

    # --- loop --------------------------------------------------------------------------------

    def run(self, stop: threading.Event, on_tick: Optional[Callable[[TickResult], None]] = None,
            max_seconds: Optional[float] = None) -> Optional[TickResult]:
        """Tick every rollout.tick_seconds until the rollout is final, `stop` is set or
        `max_seconds` passed. Returns the last tick's result."""
        deadline = time.monotonic() + max_seconds if max_seconds else None
        try:
            self.reconcile()  # a restart heals a crash between persist and router update
        except Exception as e:
            log.warning("reconcile on start failed (retried every tick): %s", e)
        while not stop.is_set():
            t0 = time.monotonic()
            res = self.tick()
            if on_tick is not None:
                on_tick(res)
            if res.final or (deadline is not None and time.monotonic() >= deadline):
                break
            stop.wait(max(0.0, self.policy.tick_seconds - (time.monotonic() - t0)))
        return self.last

    # --- HTTP: /metrics, /v1/rollout, the Alertmanager webhook -------------------------------

    def serve_http(self, host: Optional[str] = None, port: Optional[int] = None) -> Optional["ControllerHTTP"]:
        """Start the small HTTP server in a thread (rollout.metrics_host:metrics_port unless
        given); None when the port is 0 (off). `stop_http` stops it."""
        host = host or self.policy.metrics_host
        port = self.policy.metrics_port if port is None else port
        if not port:
            return None
        self._http = ControllerHTTP((host, port), self, self.cfg.serving.resolved_admin_token())
        threading.Thread(target=self._http.serve_forever, name="controller-http", daemon=True).start()
        return self._http

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def handle_alerts(self, payload: Any) -> dict:
        """Alertmanager webhook body -> rollback commands for the candidate it names.

        A firing alert with label `candidate` or `generation` equal to the active rollout's
        candidate queues one rollback (actor "alert", reason: the alert name and summary),
        unless one is already queued; resolved alerts and other generations are ignored.
        """
        if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
            raise ValueError("body must be an Alertmanager webhook object with an 'alerts' list")
        r = self.registry.active_rollout()
        out: dict[str, Any] = {"rollbacks": [], "ignored": 0, "candidate": r.candidate if r else None}
        for a in payload["alerts"]:
            if not isinstance(a, dict) or not isinstance(a.get("labels", {}), dict):
                raise ValueError("each alert must be an object with a 'labels' object")
            labels = a.get("labels") or {}
            status = a.get("status", payload.get("status"))
            named = labels.get("candidate") or labels.get("generation")
            if r is None or status != "firing" or named != r.candidate:
                out["ignored"] += 1
                continue
            pending = [c for c in self.registry.pending_commands(r.id) if c.command == "rollback"]
            if pending:
                out["ignored"] += 1
                continue
            name = str(labels.get("alertname", "unnamed alert"))
            summary = (a.get("annotations") or {}).get("summary")
            cmd = self.registry.enqueue_command(r.id, "rollback", "alert",
                                                f"alert {name}" + (f": {summary}" if summary else ""))
            out["rollbacks"].append(cmd.id)
        return out


class ControllerHTTP(ThreadingHTTPServer):
    daemon_threads = True
    MAX_BODY = 1_000_000

    def __init__(self, addr: tuple[str, int], controller: Controller, token: Optional[str]):
        self.controller = controller
        self.token = token
        super().__init__(addr, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: ControllerHTTP
    # A client that sends less body than its Content-Length would otherwise pin a thread
    # in rfile.read forever.
    timeout = 10

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: requests go to the debug log
        log.debug("http %s", fmt % args)

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, default=str).encode())

    def do_GET(self) -> None:
        c = self.server.controller
        if self.path == "/metrics":
            self._send(200, c.metrics.text(), CONTENT_TYPE_LATEST)
        elif self.path == "/v1/rollout":
            r = c.current()
            self._json(200, {"rollout": r.as_dict() if r else None,
                             "last_tick": c.last.as_dict() if c.last else None,
                             "source": c.source.name, "consecutive_source_errors": c.source_errors})
        elif self.path == "/healthz":
            self._json(200, {"ok": True})
        else:
            self._json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/v1/admin/alert":
            self._json(404, {"error": f"no route {self.path}"})
            return
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            self._json(401, {"error": "missing bearer token"})
            return
        token = self.server.token
        if not token or not hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
            self._json(403, {"error": "wrong admin token" if token else "admin is off: no token configured"})
            return
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if n < 0 or n > self.server.MAX_BODY:
            self._json(413 if n > 0 else 400, {"error": "bad Content-Length"})
            return
        try:
            payload = json.loads(self.rfile.read(n) or b"null")
            out = self.server.controller.handle_alerts(payload)
        except (ValueError, UnicodeDecodeError) as e:
            self._json(400, {"error": f"bad alert body: {e}"})
            return
        except Exception as e:
            log.exception("alert webhook failed")
            self._json(500, {"error": f"{type(e).__name__}: {e}"})
            return
        self._json(200, out)
