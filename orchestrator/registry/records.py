"""What the registry stores, as typed values: the states (enums) and the records.

The enums are `str` enums: a state compares equal to its stored spelling
(`GenerationStatus.PRODUCTION == "production"`), serialises to it in JSON, and reads back
from SQLite through the enum's constructor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional


class _StrEnum(str, Enum):
    def __str__(self) -> str:  # f"{state}" reads "production", not "GenerationStatus.PRODUCTION"
        return self.value

    __format__ = str.__format__


class GenerationStatus(_StrEnum):
    """Where a generation is in its life. A generation is trained, then either rejected by
    the offline gate or rolled out (shadow, canary), ending in production (later retired)
    or rolled back."""

    TRAINED = "trained"
    REJECTED = "rejected"
    SHADOW = "shadow"
    CANARY = "canary"
    PRODUCTION = "production"
    RETIRED = "retired"
    ROLLED_BACK = "rolled_back"


class RolloutState(_StrEnum):
    """A rollout's state; PROMOTED and ROLLED_BACK are final."""

    SHADOW = "shadow"
    CANARY = "canary"
    PAUSED = "paused"        # no promotion; automatic rollback stays on
    FROZEN = "frozen"        # nothing automatic at all until resume
    GUARDING = "guarding"    # promoted, still watched against the previous production (rollout.guard)
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def active(self) -> bool:
        return self in ACTIVE_STATES


class CommandKind(_StrEnum):
    """Operator commands the controller applies at its next tick."""

    PAUSE = "pause"
    FREEZE = "freeze"
    RESUME = "resume"
    PROMOTE = "promote"
    ROLLBACK = "rollback"


GEN_STATUSES = tuple(GenerationStatus)
# The router holds these generations' bytes: their checkpoints may not be replaced.
SERVED_STATUSES = (GenerationStatus.PRODUCTION, GenerationStatus.SHADOW, GenerationStatus.CANARY)
# Never a parent, an ancestor or a distillation target of a later generation.
EXCLUDED_FROM_LINEAGE = (GenerationStatus.REJECTED, GenerationStatus.ROLLED_BACK)
ROLLOUT_STATES = tuple(RolloutState)
ACTIVE_STATES = (RolloutState.SHADOW, RolloutState.CANARY, RolloutState.PAUSED, RolloutState.FROZEN,
                 RolloutState.GUARDING)
# States that hold the rollout where it is; `paused_from` remembers the state they left.
HELD_STATES = (RolloutState.PAUSED, RolloutState.FROZEN)
FINAL_STATES = (RolloutState.PROMOTED, RolloutState.ROLLED_BACK)
COMMANDS = tuple(CommandKind)


@dataclass(frozen=True)
class GenerationRecord:
    """One registered generation: its checkpoint (URI and sha256), lineage and status."""

    name: str
    parent: Optional[str]
    arch: str
    config_hash: str
    checkpoint_uri: str
    sha256: str
    created_at: float
    status: GenerationStatus
    metrics: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RolloutRecord:
    """One rollout of `candidate` against `baseline` (production when it started)."""

    id: int
    candidate: str
    baseline: str
    state: RolloutState
    step: int
    weight: float
    paused_from: Optional[RolloutState]
    step_started_at: float
    started_at: float
    updated_at: float
    finished_at: Optional[float]
    data: dict = field(default_factory=dict)

    @property
    def position(self) -> Optional[RolloutState]:
        """The state whose traffic plan and rule apply: for a paused or frozen rollout, the
        state it left (`paused_from`), else its state."""
        return self.paused_from if self.state in HELD_STATES else self.state

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Command:
    """An operator command queued for the controller, and its outcome once applied."""

    id: int
    rollout_id: int
    command: CommandKind
    actor: str
    reason: str
    force: bool
    created_at: float
    done_at: Optional[float]
    outcome: Optional[str]

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Event:
    """One entry of the append-only audit log."""

    id: int
    at: float
    actor: str
    action: str
    subject: str
    reason: str
    from_state: Optional[str]
    to_state: Optional[str]
    data: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Lease:
    """Who drives a rollout: one holder at a time, valid until `expires_at` unless renewed."""

    rollout_id: int
    holder: str
    acquired_at: float
    heartbeat_at: float
    expires_at: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)
