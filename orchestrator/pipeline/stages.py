"""A generation's pipeline stage, derived from the registry alone (never from process
memory), so a restarted `graceful run` finds every generation where it was.

Stages, in order: `train` -> `evaluate` (the offline gate against the production it
would replace) -> `rollout` (shadow, canary steps, guard) -> a final stage: `promoted`,
`rolled_back`, `rejected` (the enforced gate failed, or could not decide and
`gates.allow_inconclusive` is off) or `failed` (a stage raised; recorded, never retried
by the loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional


class Stage(str, Enum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    ROLLOUT = "rollout"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (Stage.PROMOTED, Stage.ROLLED_BACK, Stage.REJECTED, Stage.FAILED)


@dataclass(frozen=True)
class Facts:
    """What the registry says about one generation.

    status: its registry status, None when it is not registered (not trained).
    verdict: of its latest evaluation against the current production with its current
    bytes ("pass", "fail", "inconclusive"), None when there is none.
    rolling_out: a rollout of it is active. failed: the reason of a recorded pipeline
    failure of its current bytes (None: none).
    """

    status: Optional[str]
    verdict: Optional[str] = None
    rolling_out: bool = False
    failed: Optional[str] = None
    gate_enforced: bool = True
    allow_inconclusive: bool = False


def stage_of(f: Facts) -> Stage:
    """The stage of a generation.

    >>> stage_of(Facts(None)), stage_of(Facts("trained")), stage_of(Facts("trained", "pass"))
    (<Stage.TRAIN: 'train'>, <Stage.EVALUATE: 'evaluate'>, <Stage.ROLLOUT: 'rollout'>)
    >>> stage_of(Facts("rejected", "fail")), stage_of(Facts("rejected", "fail", gate_enforced=False))
    (<Stage.REJECTED: 'rejected'>, <Stage.ROLLOUT: 'rollout'>)
    >>> stage_of(Facts("trained", "inconclusive")), stage_of(Facts("trained", "inconclusive", allow_inconclusive=True))
    (<Stage.REJECTED: 'rejected'>, <Stage.ROLLOUT: 'rollout'>)
    >>> stage_of(Facts("retired")), stage_of(Facts("rolled_back")), stage_of(Facts("trained", failed="OOM"))
    (<Stage.PROMOTED: 'promoted'>, <Stage.ROLLED_BACK: 'rolled_back'>, <Stage.FAILED: 'failed'>)
    >>> stage_of(Facts("production", "pass", rolling_out=True))  # promoted, its guard still watching
    <Stage.ROLLOUT: 'rollout'>
    """
    if f.rolling_out:  # shadow, canary, paused, frozen, or guarding after its promotion
        return Stage.ROLLOUT
    if f.status in ("production", "retired"):
        return Stage.PROMOTED
    if f.status == "rolled_back":
        return Stage.ROLLED_BACK
    if f.status in ("shadow", "canary"):
        return Stage.ROLLOUT
    if f.failed is not None:
        return Stage.FAILED
    if f.status is None:
        return Stage.TRAIN
    if f.verdict is None:
        return Stage.EVALUATE
    if f.verdict == "pass":
        return Stage.ROLLOUT
    if f.verdict == "fail":
        return Stage.ROLLOUT if not f.gate_enforced else Stage.REJECTED
    return Stage.ROLLOUT if (not f.gate_enforced or f.allow_inconclusive) else Stage.REJECTED
