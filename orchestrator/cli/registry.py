"""`graceful evaluate` (the offline gate) and `graceful registry` (generations, lineage, audit log).

    graceful evaluate CONFIG --candidate NAME [--against NAME] [--no-report] [--json]
    graceful registry CONFIG list | show NAME | lineage NAME | events [--subject NAME] [--limit N]  [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from orchestrator.cli.common import EXIT_FAILED, EXIT_INCONCLUSIVE, EXIT_OK, UsageError, add_config_arg, add_json_arg, emit, load_or_exit
from orchestrator.registry import IntegrityError, Registry, open_registry


def _when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


# --- evaluate ------------------------------------------------------------------------------

def _cmd_evaluate(args: argparse.Namespace) -> int:
    from orchestrator.evaluation.evaluate import EvaluationError, evaluate, render

    cfg = load_or_exit(args.config)
    reg = open_registry(cfg)
    try:
        try:
            ev = evaluate(cfg, args.candidate, args.against, registry=reg)
        except EvaluationError as e:
            raise UsageError(str(e)) from None
        except IntegrityError as e:
            print(f"error: {e}", file=sys.stderr)
            if args.json:
                emit({"ok": False, "error": str(e)}, True)
            return EXIT_FAILED
        report = None
        if not args.no_report:
            from orchestrator.evaluation.report import write_report

            report = write_report(cfg, ev, reg)
    finally:
        reg.close()
    payload = {**ev.as_dict(), "report": str(report) if report else None}
    emit(payload, args.json, lambda p: render(ev) + (f"\n  report: {report}" if report else ""))
    return {"pass": EXIT_OK, "fail": EXIT_FAILED}.get(ev.verdict, EXIT_INCONCLUSIVE)


# --- registry ------------------------------------------------------------------------------

def _gen_line(g) -> str:
    acc = g.metrics.get("test_accuracy")
    acc_s = f"{acc:.4f}" if isinstance(acc, (int, float)) else "-"
    return (f"{g.name:<12} {g.status:<12} {g.parent or '-':<12} {g.arch:<6} {acc_s:<9} "
            f"{g.sha256[:12]}  {_when(g.created_at)}")


_HEADER = f"{'NAME':<12} {'STATUS':<12} {'PARENT':<12} {'ARCH':<6} {'TEST_ACC':<9} {'SHA256':<12}  CREATED"


def _need(reg: Registry, name: str):
    g = reg.generation(name)
    if g is None:
        known = [x.name for x in reg.generations()]
        raise UsageError(f"unknown generation {name!r} in {reg.location}; registered: {known}")
    return g


def _cmd_list(reg: Registry, args: argparse.Namespace) -> int:
    gens = reg.generations()
    emit([g.as_dict() for g in gens], args.json,
         lambda _: "\n".join([_HEADER] + [_gen_line(g) for g in gens]) if gens
         else f"no generation registered in {reg.location} (graceful train records them)")
    return EXIT_OK


def _cmd_show(reg: Registry, args: argparse.Namespace) -> int:
    g = _need(reg, args.name)
    evals = reg.evaluations(g.name)
    events = reg.events(g.name)
    rollout = reg.latest_rollout(g.name)
    # The record's fields at the top level (name, parent, status, sha256, ...) and again
    # under "generation", with its lineage (oldest first), evaluations and history.
    payload = {**g.as_dict(), "generation": g.as_dict(), "lineage": [x.name for x in reg.lineage(g.name)],
               "evaluations": evals, "events": [e.as_dict() for e in events],
               "latest_rollout": rollout.as_dict() if rollout else None}

    def text(_: dict) -> str:
        m = g.metrics
        lines = [f"{g.name}  status {g.status}  parent {g.parent or '-'}  arch {g.arch}",
                 f"  checkpoint {g.checkpoint_uri}", f"  sha256     {g.sha256}",
                 f"  config     {g.config_hash[:16]}  created {_when(g.created_at)}"]
        nums = [f"{k} {m[k]:.4f}" for k in ("test_accuracy", "val_accuracy") if isinstance(m.get(k), (int, float))]
        if nums:
            lines.append("  " + ", ".join(nums))
        for e in evals:
            mm = e["metrics"]
            lines.append(f"  evaluation {e['id']} vs {e['baseline']}: {mm.get('verdict', 'pass' if e['passed'] else 'fail').upper()} "
                         f"(NFR {mm.get('nfr', float('nan')):.4f}, error change {mm.get('error_change', float('nan')):+.4f})"
                         + ("" if e["passed"] else f": {'; '.join(e['reasons'])}"))
        if rollout:
            lines.append(f"  rollout {rollout.id}: {rollout.state} step {rollout.step} weight {rollout.weight}")
        lines.append("  history:")
        for e in events:
            move = f" {e.from_state or '-'} -> {e.to_state}" if e.to_state else ""
            lines.append(f"    {_when(e.at)}  {e.actor:<10} {e.action}{move}  {e.reason}")
        return "\n".join(lines)

    emit(payload, args.json, text)
    return EXIT_OK


def _cmd_lineage(reg: Registry, args: argparse.Namespace) -> int:
    _need(reg, args.name)
    chain = reg.lineage(args.name)
    emit([g.as_dict() for g in chain], args.json,
         lambda _: "\n".join(f"{'  ' * i}{'└─ ' if i else ''}{g.name} ({g.status}, sha256 {g.sha256[:12]})"
                             for i, g in enumerate(chain)))
    return EXIT_OK


def _cmd_events(reg: Registry, args: argparse.Namespace) -> int:
    events = reg.events(args.subject, args.limit)
    emit([e.as_dict() for e in events], args.json,
         lambda _: "\n".join(f"{_when(e.at)}  {e.actor:<10} {e.action:<16} {e.subject:<10} "
                             f"{(e.from_state or '-') + ' -> ' + e.to_state if e.to_state else '':<24} {e.reason}"
                             for e in events) or "no events")
    return EXIT_OK


def _cmd_registry(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args.config)
    reg = open_registry(cfg)
    try:
        return args.registry_func(reg, args)
    finally:
        reg.close()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="offline gate: a candidate against production on held-out data "
                                        "(exit 0 pass, 1 fail, 2 usage, 3 inconclusive)")
    add_config_arg(p)
    p.add_argument("--candidate", required=True, help="generation to evaluate")
    p.add_argument("--against", help="baseline generation (default: the one in production)")
    p.add_argument("--no-report", action="store_true", help="skip writing run_dir/reports/<candidate>.md")
    add_json_arg(p)
    p.set_defaults(func=_cmd_evaluate)

    r = sub.add_parser("registry", help="generations, lineage and the audit log of a run")
    add_config_arg(r)
    rs = r.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    x = rs.add_parser("list", help="every registered generation")
    add_json_arg(x)
    x.set_defaults(registry_func=_cmd_list)
    x = rs.add_parser("show", help="one generation: record, evaluations, history")
    x.add_argument("name")
    add_json_arg(x)
    x.set_defaults(registry_func=_cmd_show)
    x = rs.add_parser("lineage", help="the chain of parents of a generation, oldest first")
    x.add_argument("name")
    add_json_arg(x)
    x.set_defaults(registry_func=_cmd_lineage)
    x = rs.add_parser("events", help="the audit log, oldest first")
    x.add_argument("--subject", help="only events about this generation")
    x.add_argument("--limit", type=int, help="only the newest N events")
    add_json_arg(x)
    x.set_defaults(registry_func=_cmd_events)
    r.set_defaults(func=_cmd_registry)
