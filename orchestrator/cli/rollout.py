"""`graceful rollout` (run the controller) and the operator commands `status`, `pause`,
`freeze`, `resume`, `promote [--force]`, `rollback --reason`.

The operator commands only write to the registry (a command queue and the audit log):
the running controller, in whatever process, applies them at its next tick. Without a
running controller they wait in the queue until one starts.
"""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys
import threading
import time
from typing import Any, Optional

import requests

from orchestrator.cli.common import EXIT_FAILED, EXIT_OK, UsageError, add_config_arg, add_json_arg, emit, load_or_exit
from orchestrator.config import RunConfig
from orchestrator.registry import (FINAL_STATES, HELD_STATES, Registry, RolloutRecord, RolloutState, open_registry,
                                   registry_path)
from orchestrator.rundir import has_registry
from serving.client import RouterError

EXIT_INTERRUPTED = 130


def router_url(cfg: RunConfig, override: Optional[str]) -> str:
    return (override or cfg.serving.base_url()).rstrip("/")


def _open_registry(cfg: RunConfig, must_exist: bool = True) -> Registry:
    if must_exist and not has_registry(cfg):
        raise UsageError(f"no registry at {registry_path(cfg)}: nothing has been trained or registered for this run yet "
                         f"(graceful train CONFIG)")
    return open_registry(cfg)


def _actor(args: argparse.Namespace) -> str:
    if getattr(args, "actor", None):
        return args.actor
    try:
        return os.environ.get("USER") or getpass.getuser() or "operator"
    except Exception:
        return "operator"


def _progress(res: Any, t0: float) -> str:
    line = (f"[{time.monotonic() - t0:7.1f}s] {res.state or '-'} step {res.step} "
            f"w={res.weight if res.weight is not None else 0:.2f} {res.decision or '-'}: {res.reason}")
    for c in res.commands:
        line += f"\n           command {c}"
    if res.transition:
        line += f"\n           moved {res.transition}"
    return line


def _cmd_rollout(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args.config)
    names = [g.name for g in cfg.generations]
    if args.candidate not in names:
        raise UsageError(f"--candidate {args.candidate!r}: unknown generation; known: {names}")
    from orchestrator.apps import attach_on_cluster
    from orchestrator.rollout.controller import Controller, ControllerStopped
    from orchestrator.rollout.start import RolloutRefused, start_rollout
    from serving.client import RouterClient

    url = router_url(cfg, args.router)
    client = RouterClient(url, cfg.serving.resolved_admin_token())
    from orchestrator.rollout.sources import source_for

    source = source_for(cfg, client)
    reg = _open_registry(cfg, must_exist=False)
    actor = _actor(args)
    attach = attach_on_cluster(cfg, reg)
    ctl = None
    try:
        r = reg.active_rollout()
        if r is not None and r.candidate != args.candidate:
            raise UsageError(f"rollout {r.id} of {r.candidate!r} is active ({r.state}); "
                             f"finish it first (graceful rollback/promote CONFIG)")
        if r is None:
            latest = reg.latest_rollout(args.candidate)
            if latest is not None and latest.state in FINAL_STATES and not args.new:
                r = latest  # a restart after the end: report it (and heal the router), never redo it
            else:
                try:
                    r = start_rollout(cfg, reg, client, source, args.candidate, actor,
                                      args.reason or f"graceful rollout --candidate {args.candidate}",
                                      skip_gate=args.skip_gate, attach=attach)
                except RolloutRefused as e:
                    raise UsageError(str(e)) from None
                except (RouterError, requests.RequestException) as e:
                    print(f"error: router at {url}: {e}", file=sys.stderr)
                    return EXIT_FAILED
        ctl = Controller(cfg, reg, client, source, rollout_id=r.id, attach=attach)
        if r.state not in FINAL_STATES:
            try:
                ctl.hold_lease(r, time.time())
            except ControllerStopped as e:
                print(f"error: {e}", file=sys.stderr)
                return EXIT_FAILED
        try:
            http = ctl.serve_http()
        except OSError as e:
            http = None
            print(f"warning: controller endpoint {cfg.rollout.metrics_host}:{cfg.rollout.metrics_port} "
                  f"not started ({e}); /metrics and the alert webhook are off", file=sys.stderr)
        out = sys.stderr if args.json else sys.stdout
        print(f"rollout {r.id}: {r.candidate} vs {r.baseline} ({r.state} step {r.step}) via {url}, "
              f"source {source.name}, controller {ctl.holder}"
              + (f", metrics at http://{http.server_address[0]}:{http.server_address[1]}/metrics" if http else ""),
              file=out, flush=True)
        stop = threading.Event()
        interrupted = {"code": None}

        def on_signal(signum, _frame):
            interrupted["code"] = EXIT_INTERRUPTED if signum == signal.SIGINT else 128 + signum
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        t0 = time.monotonic()
        last_line = [None, 0.0]

        def on_tick(res: Any) -> None:
            key = (res.state, res.step, res.decision)
            if res.commands or res.transition or key != last_line[0] or time.monotonic() - last_line[1] > 10:
                print(_progress(res, t0), file=out, flush=True)
                last_line[0], last_line[1] = key, time.monotonic()

        try:
            ctl.run(stop, on_tick=on_tick, max_seconds=args.max_seconds)
        finally:
            ctl.stop_http()
        final = reg.rollout(r.id)
        summary = {"rollout_id": final.id, "candidate": final.candidate, "baseline": final.baseline,
                   "state": final.state, "step": final.step, "weight": final.weight,
                   "finished": final.state in FINAL_STATES, "controller": ctl.holder, "stopped": ctl.stopped,
                   "last_decision": ctl.last.as_dict() if ctl.last else None}
        emit(summary, args.json, lambda s: f"rollout {s['rollout_id']} of {s['candidate']}: {s['state']} "
                                           f"(step {s['step']}, weight {s['weight']:.2f})"
                                           + (f"; controller stopped: {s['stopped']}" if s["stopped"] else ""))
        if ctl.stopped is not None:
            print(f"error: {ctl.stopped}", file=sys.stderr)
            return EXIT_FAILED
        if interrupted["code"] is not None:
            return interrupted["code"]
        return EXIT_OK if final.state == RolloutState.PROMOTED else EXIT_FAILED
    finally:
        if ctl is not None:
            ctl.release_lease()  # any exit but a crash hands the rollout over at once (only ours is deleted)
        reg.close()
        client.close()


# --- status ----------------------------------------------------------------------------------

def _live(cfg: RunConfig) -> Optional[dict]:
    """The running controller's view (GET /v1/rollout on its endpoint), None if none answers."""
    if not cfg.rollout.metrics_port:
        return None
    try:
        r = requests.get(f"http://{cfg.rollout.metrics_host}:{cfg.rollout.metrics_port}/v1/rollout", timeout=1.0)
        return r.json() if r.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def _render_status(s: dict) -> str:
    lines = [f"production: {s['production'] or '-'}  (registry {s['registry']})"]
    gens = s["generations"]
    if gens:
        lines.append("generations: " + ", ".join(f"{g['name']} {g['status']}" for g in gens))
    p = s.get("pipeline")
    if p:
        lines.append("pipeline" + (" (PAUSED)" if p["paused"] else "") + ": "
                     + ", ".join(f"{g['name']} {g['stage']}" for g in p["generations"])
                     + (f"; next: {p['next']}" if p["next"] else "; idle"))
    r = s["rollout"]
    if r is None:
        lines.append("no rollout yet")
        return "\n".join(lines)
    lines += [f"{'candidate':<12}{'baseline':<12}{'state':<13}{'step':>5}{'weight':>8}  {'live NFR':>9}  last decision",
              f"{r['candidate']:<12}{r['baseline']:<12}{r['state']:<13}{r['step']:>5}{r['weight']:>8.2f}  "
              f"{(format(s['live_nfr'], '.4f') if s['live_nfr'] is not None else '-'):>9}  "
              f"{s['last_decision'] or '-'}"]
    if s.get("evidence"):
        lines.append("evidence: " + evidence_line(s["evidence"]))
    lease = s.get("lease")
    lines.append(f"rollout {r['id']}, controller {'running' if s['controller_running'] else 'not running'}"
                 + (f" (lease held by {lease['holder']})" if lease else "")
                 + (f", {len(s['pending_commands'])} command(s) queued" if s["pending_commands"] else ""))
    lines.append("recent events:")
    for e in s["events"]:
        lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(e['at']))} {e['actor']:<10} {e['action']:<14} "
                     f"{(e['from_state'] or '') + ('->' + e['to_state'] if e['to_state'] else ''):<22} {e['reason']}")
    return "\n".join(lines)


def evidence_line(e: dict) -> str:
    """The numbers behind a decision, one line: each test's counts, statistic and boundaries."""
    def g(k: str) -> float:
        return float(e.get(k, 0.0))

    parts = [f"NFR {g('negative_flips'):.0f}/{g('labelled'):.0f} LLR {g('llr_nfr'):.2f} "
             f"(promote <= {g('llr_promote_at'):.2f}, rollback >= {g('llr_rollback_at'):.2f})"]
    if "d_lower" in e:
        parts.append(f"disagreement in [{g('d_lower'):.4f}, {g('d_upper'):.4f}], "
                     f"{g('labelled_disagreements'):.0f} labelled")
    if "errors" in e:
        parts.append(f"errors {g('errors'):.0f}/{g('requests'):.0f} LLR {g('llr_error'):.2f} "
                     f"(rollback >= {g('llr_error_rollback_at'):.2f})")
    if "timed" in e:
        parts.append(f"slow {g('slow'):.0f}/{g('timed'):.0f} (allowed {g('slow_allowed'):.4f}) LLR "
                     f"{g('llr_latency'):.2f} (rollback >= {g('llr_latency_rollback_at'):.2f})")
    return "; ".join(parts)


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args.config)
    with _open_registry(cfg) as reg:
        prod = reg.production()
        payload: dict[str, Any] = {
            "production": prod.name if prod else None, "registry": reg.location,
            "generations": [{"name": g.name, "status": g.status, "parent": g.parent} for g in reg.generations()],
            "rollout": None, "controller_running": False, "live_nfr": None, "last_decision": None,
            "last_tick": None, "evidence": None, "lease": None, "pending_commands": [], "events": []}
        from orchestrator.pipeline.loop import pipeline_status

        payload["pipeline"] = pipeline_status(cfg, reg)
        r = reg.active_rollout() or reg.latest_rollout(args.candidate)
        if args.candidate and (r is None or r.candidate != args.candidate):
            r = reg.latest_rollout(args.candidate)
            if r is None:
                raise UsageError(f"no rollout of {args.candidate!r} in {reg.location}")
        if r is not None:
            live = _live(cfg)
            last_tick = (live or {}).get("last_tick") if (live or {}).get("rollout", {}) and \
                live["rollout"].get("id") == r.id else None
            decisions = [e for e in reg.events(r.candidate)
                         if e.action == "decision" and e.data.get("rollout_id") == r.id]
            last_decision = (f"{last_tick['decision']}: {last_tick['reason']}" if last_tick and last_tick.get("decision")
                             else f"{decisions[-1].data.get('decision')}: {decisions[-1].reason}" if decisions else None)
            evidence = ((last_tick or {}).get("stats") or
                        (decisions[-1].data.get("evidence") if decisions else None) or None)
            lease = reg.lease(r.id)
            payload.update({
                "rollout": r.as_dict(), "controller_running": last_tick is not None,
                "live_nfr": (last_tick or {}).get("stats", {}).get("live_nfr"),
                "last_decision": last_decision, "last_tick": last_tick, "evidence": evidence,
                "lease": lease.as_dict() if lease is not None and lease.expires_at > time.time() else None,
                "pending_commands": [c.as_dict() for c in reg.pending_commands(r.id)],
                "events": [e.as_dict() for e in reg.events(r.candidate, limit=args.events)]})
    emit(payload, args.json, _render_status)
    return EXIT_OK


# --- operator commands -----------------------------------------------------------------------

def _enqueue(args: argparse.Namespace, command: str, reason: str, force: bool = False) -> int:
    cfg = load_or_exit(args.config)
    with _open_registry(cfg) as reg:
        r: Optional[RolloutRecord] = reg.active_rollout()
        if r is None:
            raise UsageError(f"no active rollout in {reg.location}")
        if args.candidate and r.candidate != args.candidate:
            raise UsageError(f"the active rollout is of {r.candidate!r}, not {args.candidate!r}")
        if command == "pause" and r.state == RolloutState.PAUSED:
            raise UsageError(f"rollout {r.id} of {r.candidate!r} is already paused")
        if command == "freeze" and r.state == RolloutState.FROZEN:
            raise UsageError(f"rollout {r.id} of {r.candidate!r} is already frozen")
        if command == "resume" and r.state not in HELD_STATES:
            raise UsageError(f"rollout {r.id} of {r.candidate!r} is not paused or frozen ({r.state})")
        cmd = reg.enqueue_command(r.id, command, _actor(args), reason, force=force)
        outcome = None
        deadline = time.monotonic() + (args.wait or 0)
        while args.wait and time.monotonic() < deadline:
            done = [c for c in reg.commands(r.id) if c.id == cmd.id and c.done_at is not None]
            if done:
                outcome = done[0].outcome
                break
            time.sleep(0.2)
    payload = {"command_id": cmd.id, "command": command, "force": force, "rollout_id": r.id,
               "candidate": r.candidate, "actor": cmd.actor, "reason": reason, "outcome": outcome}
    emit(payload, args.json, lambda p: (
        f"{command}{' --force' if force else ''} queued as #{p['command_id']} for rollout {p['rollout_id']} "
        f"({p['candidate']}, {r.state} step {r.step}) by {p['actor']}; "
        + (f"outcome: {outcome}" if outcome else
           f"the controller applies it within one tick ({cfg.rollout.tick_seconds:g} s)")))
    if outcome is not None and outcome.startswith(("refused", "ignored")):
        return EXIT_FAILED
    return EXIT_OK


def _cmd_pause(args: argparse.Namespace) -> int:
    return _enqueue(args, "pause", args.reason or "paused by operator")


def _cmd_freeze(args: argparse.Namespace) -> int:
    return _enqueue(args, "freeze", args.reason or "frozen by operator")


def _cmd_resume(args: argparse.Namespace) -> int:
    return _enqueue(args, "resume", args.reason or "resumed by operator")


def _cmd_promote(args: argparse.Namespace) -> int:
    return _enqueue(args, "promote", args.reason or ("forced promotion" if args.force else "promoted by operator"),
                    force=args.force)


def _cmd_rollback(args: argparse.Namespace) -> int:
    if not args.reason.strip():
        raise UsageError("--reason must not be empty")
    return _enqueue(args, "rollback", args.reason)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollout", help="start (or resume) the rollout of a candidate against the registry's production and run its controller until promoted or rolled back")
    add_config_arg(p)
    p.add_argument("--candidate", required=True, help="generation to roll out (attached to the router as a shadow if it is not)")
    p.add_argument("--router", help="router base URL (default: http://serving.host:serving.port)")
    p.add_argument("--max-seconds", type=float, help="stop the controller after this long (the rollout stays "
                                                     "where it is; run again to resume)")
    p.add_argument("--reason", help="reason recorded when a new rollout starts")
    p.add_argument("--actor", help="who starts it (default: $USER)")
    p.add_argument("--new", action="store_true", help="start a new rollout even if this candidate's last one "
                                                      "finished (e.g. retry after a rollback)")
    p.add_argument("--skip-gate", action="store_true", help="roll out a generation without a passing offline gate "
                                                            "against the current production (offline_gate: enforce); "
                                                            "recorded in the audit log")
    add_json_arg(p)
    p.set_defaults(func=_cmd_rollout)

    p = sub.add_parser("status", help="the active (or latest) rollout: state, step, weight, live NFR, audit events")
    add_config_arg(p)
    p.add_argument("--candidate", help="that candidate's latest rollout")
    p.add_argument("--events", type=int, default=10, help="recent audit events shown (default 10)")
    add_json_arg(p)
    p.set_defaults(func=_cmd_status)

    for name, func, doc in (("pause", _cmd_pause, "hold the active rollout where it is: no promotion, "
                                                  "automatic rollback stays on"),
                            ("freeze", _cmd_freeze, "hold the active rollout where it is with nothing automatic "
                                                    "(no promotion, no automatic or alert rollback) until resume"),
                            ("resume", _cmd_resume, "resume a paused or frozen rollout"),
                            ("promote", _cmd_promote, "advance one step if the rule agrees (skips the bake "
                                                      "time); --force: promote fully now"),
                            ("rollback", _cmd_rollback, "roll the candidate back now")):
        p = sub.add_parser(name, help=doc)
        add_config_arg(p)
        p.add_argument("--candidate", help="refuse unless the active rollout is of this candidate")
        p.add_argument("--reason", required=name == "rollback", help="recorded in the audit log")
        p.add_argument("--actor", help="who does it (default: $USER)")
        p.add_argument("--wait", type=float, default=0.0, help="wait up to this many seconds for the outcome")
        if name == "promote":
            p.add_argument("--force", action="store_true", help="skip the rule and the remaining steps")
        add_json_arg(p)
        p.set_defaults(func=func)
