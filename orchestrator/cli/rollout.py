"""`graceful rollout` (run the controller) and the operator commands `status`, `pause`,
`resume`, `promote [--force]`, `rollback --reason`.

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
from orchestrator.registry.store import FINAL_STATES, Registry, RegistryError, RolloutRecord, registry_path

EXIT_INTERRUPTED = 130


def router_url(cfg: RunConfig, override: Optional[str]) -> str:
    return (override or f"http://{cfg.serving.host}:{cfg.serving.port}").rstrip("/")


def build_source(cfg: RunConfig, client: Any):
    """The metric source `rollout.metric_source` names."""
    from orchestrator.rollout.sources import PrometheusSource, RouterSource

    if cfg.rollout.metric_source == "prometheus":
        return PrometheusSource(cfg.rollout.prometheus_url, cfg.rollout.prometheus_query_timeout_s,
                                cfg.rollout.prometheus_latency_window)
    return RouterSource(client)


def _open_registry(cfg: RunConfig, must_exist: bool = True) -> Registry:
    path = registry_path(cfg)
    if must_exist and not path.is_file():
        raise UsageError(f"no registry at {path}: no rollout has been started for this run "
                         f"(graceful rollout CONFIG --candidate NAME)")
    return Registry(path)


def _actor(args: argparse.Namespace) -> str:
    if getattr(args, "actor", None):
        return args.actor
    try:
        return os.environ.get("USER") or getpass.getuser() or "operator"
    except Exception:
        return "operator"


def _ensure_registered(cfg: RunConfig, reg: Registry, name: str, router_sha: Optional[str]) -> None:
    """Register a trained generation the registry does not know yet (from its run dir),
    and refuse one the router serves with other bytes than the registry recorded."""
    from orchestrator.chain import generation_dir, read_metrics

    rec = reg.generation(name)
    if rec is None:
        metrics = read_metrics(cfg, name)
        if not metrics or not metrics.get("sha256"):
            raise UsageError(f"generation {name!r} is neither registered nor trained in {cfg.run_dir}")
        parent = cfg.parent_of(name)
        parent_name = parent.name if parent is not None and reg.generation(parent.name) is not None else None
        rec = reg.add_generation(name, parent_name, cfg.generation(name).arch.type, cfg.config_hash(),
                                 str(generation_dir(cfg, name) / "model.pt"), metrics["sha256"],
                                 metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                                 actor="rollout")
    if router_sha and rec.sha256 != router_sha:
        raise RegistryError(f"the router serves {name!r} with sha256 {router_sha[:12]}..., the registry "
                            f"recorded {rec.sha256[:12]}...; refusing to roll out other bytes")


def gate_check(cfg: RunConfig, reg: Registry, name: str, skip_gate: bool, reason: str) -> str:
    """The audit reason of a new rollout of `name`, or UsageError when its offline gate
    rejected it.

    registry.start_rollout overwrites any status with 'shadow', so this is the only place
    that stops a rejected generation from going live: refused when its status is
    'rejected' and its `generations[].offline_gate` is 'enforce' (the default), unless
    `skip_gate` (--skip-gate), which is appended to the reason; an 'advisory' gate allows
    it and says so in the reason.
    """
    rec = reg.generation(name)
    if rec is None or rec.status != "rejected":
        return reason
    if cfg.generation(name).offline_gate == "advisory":
        return f"{reason} (offline gate rejected it; the gate is advisory for {name})"
    if not skip_gate:
        raise UsageError(f"generation {name!r} was rejected by the offline gate (registry status 'rejected', "
                         f"generations[].offline_gate: enforce); refusing to roll it out. See "
                         f"`graceful registry show` for the report; --skip-gate overrides (recorded in the "
                         f"audit log)")
    return f"{reason} (offline gate rejected it; skipped with --skip-gate)"


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
    from orchestrator.rollout.controller import Controller, start_rollout
    from serving.client import RouterClient

    url = router_url(cfg, args.router)
    client = RouterClient(url, cfg.serving.resolved_admin_token())
    source = build_source(cfg, client)
    reg = _open_registry(cfg, must_exist=False)
    actor = _actor(args)
    try:
        active = reg.active_rollout()
        if active is not None and active.candidate != args.candidate:
            raise UsageError(f"rollout {active.id} of {active.candidate!r} is active ({active.state}); "
                             f"finish it first (graceful rollback/promote CONFIG)")
        r = active
        if r is None:
            latest = reg.latest_rollout(args.candidate)
            if latest is not None and latest.state in FINAL_STATES and not args.new:
                r = latest  # a restart after the end: report it (and heal the router), never redo it
            else:
                reason = gate_check(cfg, reg, args.candidate, args.skip_gate,
                                    args.reason or f"graceful rollout --candidate {args.candidate}")
                try:
                    status = client.status()
                except Exception as e:
                    print(f"error: router at {url} unreachable: {e}", file=sys.stderr)
                    return EXIT_FAILED
                gens = status.get("generations", {})
                baseline = status.get("production")
                if args.candidate == baseline:
                    raise UsageError(f"{args.candidate!r} is already production at {url}")
                if not gens.get(args.candidate, {}).get("attached"):
                    raise UsageError(f"{args.candidate!r} is not attached to the router at {url}; serve it first "
                                     f"(graceful serve CONFIG --candidate {args.candidate})")
                _ensure_registered(cfg, reg, baseline, gens.get(baseline, {}).get("sha256"))
                _ensure_registered(cfg, reg, args.candidate, gens[args.candidate].get("sha256"))
                r = start_rollout(reg, source, args.candidate, baseline, actor, reason)
        ctl = Controller(cfg, reg, client, source, rollout_id=r.id)
        try:
            http = ctl.serve_http()
        except OSError as e:
            http = None
            print(f"warning: controller endpoint {cfg.rollout.metrics_host}:{cfg.rollout.metrics_port} "
                  f"not started ({e}); /metrics and the alert webhook are off", file=sys.stderr)
        out = sys.stderr if args.json else sys.stdout
        print(f"rollout {r.id}: {r.candidate} vs {r.baseline} ({r.state} step {r.step}) via {url}, "
              f"source {source.name}" + (f", metrics at http://{http.server_address[0]}:{http.server_address[1]}"
                                          f"/metrics" if http else ""), file=out, flush=True)
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
                   "finished": final.state in FINAL_STATES,
                   "last_decision": ctl.last.as_dict() if ctl.last else None}
        emit(summary, args.json, lambda s: f"rollout {s['rollout_id']} of {s['candidate']}: {s['state']} "
                                           f"(step {s['step']}, weight {s['weight']:.2f})")
        if interrupted["code"] is not None:
            return interrupted["code"]
        return EXIT_OK if final.state == "promoted" else EXIT_FAILED
    finally:
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
    r = s["rollout"]
    lines = [f"{'candidate':<12}{'baseline':<12}{'state':<13}{'step':>5}{'weight':>8}  {'live NFR':>9}  last decision",
             f"{r['candidate']:<12}{r['baseline']:<12}{r['state']:<13}{r['step']:>5}{r['weight']:>8.2f}  "
             f"{(format(s['live_nfr'], '.4f') if s['live_nfr'] is not None else '-'):>9}  "
             f"{s['last_decision'] or '-'}"]
    lines.append(f"rollout {r['id']}, controller {'running' if s['controller_running'] else 'not running'}"
                 + (f", {len(s['pending_commands'])} command(s) queued" if s["pending_commands"] else ""))
    lines.append("recent events:")
    for e in s["events"]:
        lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(e['at']))} {e['actor']:<10} {e['action']:<14} "
                     f"{(e['from_state'] or '') + ('->' + e['to_state'] if e['to_state'] else ''):<22} {e['reason']}")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args.config)
    with _open_registry(cfg) as reg:
        r = reg.active_rollout() or reg.latest_rollout(args.candidate)
        if args.candidate and (r is None or r.candidate != args.candidate):
            r = reg.latest_rollout(args.candidate)
        if r is None:
            raise UsageError("no rollout" + (f" of {args.candidate!r}" if args.candidate else "") + " in "
                             f"{registry_path(cfg)}")
        live = _live(cfg)
        last_tick = (live or {}).get("last_tick") if (live or {}).get("rollout", {}) and \
            live["rollout"].get("id") == r.id else None
        decisions = [e for e in reg.events(r.candidate) if e.action == "decision" and e.data.get("rollout_id") == r.id]
        last_decision = (f"{last_tick['decision']}: {last_tick['reason']}" if last_tick and last_tick.get("decision")
                         else f"{decisions[-1].data.get('decision')}: {decisions[-1].reason}" if decisions else None)
        payload = {"rollout": r.as_dict(), "controller_running": last_tick is not None,
                   "live_nfr": (last_tick or {}).get("stats", {}).get("live_nfr"),
                   "last_decision": last_decision, "last_tick": last_tick,
                   "pending_commands": [c.as_dict() for c in reg.pending_commands(r.id)],
                   "events": [e.as_dict() for e in reg.events(r.candidate, limit=args.events)]}
    emit(payload, args.json, _render_status)
    return EXIT_OK


# --- operator commands -----------------------------------------------------------------------

def _enqueue(args: argparse.Namespace, command: str, reason: str, force: bool = False) -> int:
    cfg = load_or_exit(args.config)
    with _open_registry(cfg) as reg:
        r: Optional[RolloutRecord] = reg.active_rollout()
        if r is None:
            raise UsageError("no active rollout in " + str(registry_path(cfg)))
        if args.candidate and r.candidate != args.candidate:
            raise UsageError(f"the active rollout is of {r.candidate!r}, not {args.candidate!r}")
        if command == "pause" and r.state == "paused":
            raise UsageError(f"rollout {r.id} of {r.candidate!r} is already paused")
        if command == "resume" and r.state != "paused":
            raise UsageError(f"rollout {r.id} of {r.candidate!r} is not paused ({r.state})")
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
    p = sub.add_parser("rollout", help="run the rollout controller for a candidate until promoted or rolled back")
    add_config_arg(p)
    p.add_argument("--candidate", required=True, help="generation to roll out (attached to the router)")
    p.add_argument("--router", help="router base URL (default: http://serving.host:serving.port)")
    p.add_argument("--max-seconds", type=float, help="stop the controller after this long (the rollout stays "
                                                     "where it is; run again to resume)")
    p.add_argument("--reason", help="reason recorded when a new rollout starts")
    p.add_argument("--actor", help="who starts it (default: $USER)")
    p.add_argument("--new", action="store_true", help="start a new rollout even if this candidate's last one "
                                                      "finished (e.g. retry after a rollback)")
    p.add_argument("--skip-gate", action="store_true", help="roll out a generation the offline gate rejected "
                                                            "(offline_gate: enforce); recorded in the audit log")
    add_json_arg(p)
    p.set_defaults(func=_cmd_rollout)

    p = sub.add_parser("status", help="the active (or latest) rollout: state, step, weight, live NFR, audit events")
    add_config_arg(p)
    p.add_argument("--candidate", help="that candidate's latest rollout")
    p.add_argument("--events", type=int, default=10, help="recent audit events shown (default 10)")
    add_json_arg(p)
    p.set_defaults(func=_cmd_status)

    for name, func, doc in (("pause", _cmd_pause, "hold the active rollout where it is"),
                            ("resume", _cmd_resume, "resume a paused rollout"),
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
