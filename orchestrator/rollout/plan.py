"""The router's traffic plan as the registry says it should be: pure functions of the
persisted rollout (and, at start-up, of production), shared by the controller's
reconciliation and every way of starting the router."""

from __future__ import annotations

from typing import Iterable, Optional

from orchestrator.registry.records import RolloutRecord, RolloutState


class ReconcileError(RuntimeError):
    """The router cannot be made to match the persisted rollout (e.g. a generation is not attached)."""


def desired_traffic(r: RolloutRecord, current: dict) -> dict:
    """The router plan that matches persisted rollout `r`, given the router's current plan
    (`current`: the `/v1/status` answer; only production, weights, shadows are used).

    shadow: baseline serves everything, candidate shadowed; canary: candidate r.weight,
    baseline 1 - r.weight, candidate still shadowed (so production-served requests are
    compared too); guarding: candidate at weight 1 with the baseline still the router's
    production, so that every request is still compared with it (the router mirrors
    production on requests the candidate serves); paused or frozen: the plan of the
    state it left; promoted: candidate is
    production at weight 1, neither shadowed; rolled back: baseline production at weight
    1, candidate no longer shadowed. Other generations keep weight 0 and their shadowing.
    """
    weights = {g: 0.0 for g in current.get("weights", {})}
    for g in (r.candidate, r.baseline):
        if g not in weights:
            raise ReconcileError(f"generation {g!r} is not attached to the router "
                                 f"(attached: {sorted(weights)}); serve it first")
    shadows = [s for s in current.get("shadows", []) if s not in (r.candidate, r.baseline)]
    state = r.position
    if state == RolloutState.PROMOTED:
        weights[r.candidate] = 1.0
        return {"weights": weights, "shadows": shadows, "production": r.candidate}
    if state == RolloutState.ROLLED_BACK:
        weights[r.baseline] = 1.0
        return {"weights": weights, "shadows": shadows, "production": r.baseline}
    w = 1.0 if state == RolloutState.GUARDING else float(r.weight) if state == RolloutState.CANARY else 0.0
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


def next_position(r: RolloutRecord, n_steps: int, weights: list[float],
                  guard: bool = False) -> tuple[RolloutState, int, float]:
    """(state, step, weight) one promotion after `r`: shadow -> canary 1 -> ... -> canary n ->
    [guarding (step n, weight 1) when `guard`] -> promoted (step n, weight 1). `r` must
    be in shadow, canary or guarding (a held rollout: the state it left)."""
    state = r.position
    if state == RolloutState.SHADOW:
        return RolloutState.CANARY, 1, weights[0]
    if state == RolloutState.CANARY and r.step < n_steps:
        return RolloutState.CANARY, r.step + 1, weights[r.step]
    if state == RolloutState.CANARY and guard:
        return RolloutState.GUARDING, r.step, 1.0
    if state in (RolloutState.CANARY, RolloutState.GUARDING):
        return RolloutState.PROMOTED, r.step, 1.0
    raise ValueError(f"no next step from state {r.state!r}")




def registry_plan(production: str, active: Optional[RolloutRecord], attached: Iterable[str],
                  shadows: Iterable[str] = ()) -> dict:
    """The plan a router starts with: `production` serves everything, `shadows` are
    mirrored; while a rollout is active its persisted position wins (`desired_traffic`).
    `attached` lists the generations the router holds (all at weight 0 unless serving)."""
    current = {"weights": {g: 0.0 for g in attached}, "shadows": [s for s in shadows if s != production]}
    if active is not None and active.state.active:
        return desired_traffic(active, current)
    weights = dict(current["weights"])
    if production not in weights:
        raise ReconcileError(f"production {production!r} is not attached to the router (attached: {sorted(weights)})")
    weights[production] = 1.0
    return {"weights": weights, "shadows": current["shadows"], "production": production}
