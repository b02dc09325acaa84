"""Starting a rollout: every entry point (`graceful rollout`, the demo, a Python caller)
comes through `start_rollout`, so its safety checks hold everywhere:

- the baseline is the registry's production, never a name from the caller;
- both generations are registered (the one registration path), their files still have
  the recorded bytes, and the router, where it reports a sha256, serves those bytes;
- the baseline is still production when the rollout is recorded (one transaction);
- an enforced offline gate needs a passing evaluation of these exact bytes against the
  *current* production (a generation never evaluated, evaluated against an older
  production or retrained since, does not go live); `skip_gate` overrides and the audit
  log says so; an `advisory` gate lets it through and says so too; an inconclusive
  evaluation (too little test data to decide) does not pass unless
  `gates.allow_inconclusive`, and then the audit reason says the live rollout decides;
- a candidate the router does not hold is attached (deployed beside production as a
  shadow) when the caller can do that (`attach`), else refused with what to run.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from orchestrator.config import RunConfig
from orchestrator.registry import Registry, RegistryError, RolloutRecord, ensure_registered, production_of
from orchestrator.rollout.decision import Counts
from orchestrator.rollout.sources import MetricSource, SourceError, counts_to_dict, read_source

log = logging.getLogger("graceful.controller")


class RolloutRefused(RegistryError):
    """A rollout the library will not start; the message says why and what would allow it."""


INCONCLUSIVE_WHY = ("the test set is too small to decide at gates.alpha; evaluate on more data, or set "
                    "gates.allow_inconclusive to let the live rollout decide")


def gate_verdict(reg: Registry, candidate: str, baseline: str,
                 allow_inconclusive: bool = False) -> tuple[bool, str]:
    """(passed, what the registry says) of `candidate`'s offline gate against `baseline`:
    its latest evaluation against `baseline` of the bytes both have now. An inconclusive
    evaluation (its verdict is in the record's metrics) does not pass unless
    `allow_inconclusive` (gates.allow_inconclusive); a record without a verdict is read
    from its `passed`."""
    cand, base = reg.generation(candidate), reg.generation(baseline)
    evs = [e for e in reg.evaluations(candidate) if e["baseline"] == baseline]
    if not evs:
        return False, f"never evaluated against production {baseline!r}"
    e = evs[-1]
    m = e["metrics"]
    if m.get("candidate_sha256") is None or m.get("baseline_sha256") is None:
        return False, f"evaluation {e['id']} against {baseline!r} does not record the bytes it judged; evaluate again"
    stale = [who for who, rec, key in (("candidate", cand, "candidate_sha256"), ("production", base, "baseline_sha256"))
             if rec is not None and m[key] != rec.sha256]
    if stale:
        return False, f"evaluation {e['id']} against {baseline!r} was of other bytes ({' and '.join(stale)} retrained since)"
    verdict = m.get("verdict") or ("pass" if e["passed"] else "fail")
    if verdict == "inconclusive":
        if allow_inconclusive:
            return True, (f"evaluation {e['id']} against {baseline!r} was inconclusive; gates.allow_inconclusive "
                          f"lets the live rollout decide")
        return False, (f"evaluation {e['id']} against {baseline!r} was inconclusive: {INCONCLUSIVE_WHY} ("
                       + "; ".join(e["reasons"]) + ")")
    if verdict != "pass":
        return False, f"evaluation {e['id']} against {baseline!r} failed: " + "; ".join(e["reasons"])
    return True, f"evaluation {e['id']} against {baseline!r} passed"


def gate_reason(cfg: RunConfig, reg: Registry, candidate: str, baseline: str, skip_gate: bool, reason: str) -> str:
    """The audit reason of a new rollout, or RolloutRefused when an enforced gate blocks it."""
    passed, why = gate_verdict(reg, candidate, baseline, cfg.gates.allow_inconclusive)
    if passed:
        return f"{reason} (offline gate: {why})"
    try:
        mode = cfg.generation(candidate).offline_gate
    except KeyError:
        mode = "enforce"
    if mode == "advisory":
        return f"{reason} (offline gate: {why}; the gate is advisory for {candidate})"
    if skip_gate:
        return f"{reason} (offline gate: {why}; skipped with --skip-gate)"
    # Evaluating the same bytes on the same test split again decides nothing new.
    again = "" if " was inconclusive: " in why else f"run `graceful evaluate CONFIG --candidate {candidate}`; "
    raise RolloutRefused(f"generation {candidate!r} has no passing offline gate against production {baseline!r} "
                         f"({why}; generations[].offline_gate: enforce): {again}--skip-gate overrides "
                         f"(recorded in the audit log)")


def start_rollout(cfg: RunConfig, reg: Registry, router: Any, source: MetricSource, candidate: str, actor: str,
                  reason: str, *, skip_gate: bool = False,
                  attach: Optional[Callable[[str], None]] = None) -> RolloutRecord:
    """Start a rollout of `candidate` against the registry's production (state shadow,
    evidence counting from now), after the checks in this module's docstring.

    `router`: status() and set_traffic() (serving.client.RouterClient); `attach(name)`
    deploys and attaches a generation to it. A router whose production is not the
    registry's is brought back to the registry's plan first. Raises RolloutRefused (or
    RegistryError) with the reason; nothing is recorded then."""
    prod = production_of(cfg, reg)
    if prod is None:
        raise RolloutRefused("no generation is in production: train the first generation, which becomes production")
    if candidate == prod.name:
        raise RolloutRefused(f"{candidate!r} is production already")
    active = reg.active_rollout()
    if active is not None:
        raise RolloutRefused(f"rollout {active.id} of {active.candidate!r} is active ({active.state}); finish it "
                             f"first (graceful promote / rollback CONFIG)")
    try:
        cand = ensure_registered(cfg, reg, candidate, actor)
        reg.verify_checkpoint(candidate)
        reg.verify_checkpoint(prod.name)
    except RegistryError as e:  # untrained, unknown, or bytes that are not the recorded ones
        raise RolloutRefused(str(e)) from None
    reason = gate_reason(cfg, reg, candidate, prod.name, skip_gate, reason)
    status = router.status()
    if candidate not in status.get("weights", {}):
        if attach is None:
            raise RolloutRefused(f"{candidate!r} is not attached to the router; serve it first "
                                 f"(graceful serve CONFIG --candidate {candidate})")
        log.info("attaching %s to the router as a shadow", candidate)
        attach(candidate)
        status = router.status()
    for rec in (prod, cand):
        served = status.get("generations", {}).get(rec.name, {}).get("sha256")
        if served and served != rec.sha256:
            raise RolloutRefused(f"the router serves {rec.name!r} with sha256 {served[:12]}..., the registry "
                                 f"recorded {rec.sha256[:12]}...; refusing to roll out other bytes")
    # The router is not moved here: the controller's first tick reconciles it with the
    # persisted rollout (production = the baseline), after the row exists.
    return begin_rollout(reg, source, candidate, prod.name, actor, reason, baseline_is_production=True)


def begin_rollout(reg: Registry, source: MetricSource, candidate: str, baseline: str, actor: str,
                  reason: str, baseline_is_production: bool = False) -> RolloutRecord:
    """The record `start_rollout` ends with, below its checks (tests of the controller
    start here): evidence counts from now, so the source's current snapshot is stored as
    the first step's base (None when the source is down: its first good read is)."""
    try:
        raw = counts_to_dict(read_source(source, candidate, baseline))
    except SourceError as e:
        log.warning("metric source down at rollout start (%s): evidence counts from its first read", e)
        raw = None
    return reg.start_rollout(candidate, baseline, actor, reason,
                             data={"raw_at_step_start": raw, "total_at_step_start": counts_to_dict(Counts())},
                             baseline_is_production=baseline_is_production)
