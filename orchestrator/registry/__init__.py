"""The registry: the single source of truth of a run (lineage, statuses, evaluations,
rollouts, operator commands, controller leases, audit log).

    records   the states (enums) and the typed records
    schema    the schema and its migrations (SQLite; the PostgreSQL baseline)
    backends  where rows live: an SQLite file, or a PostgreSQL database (`registry.url`)
    store     `Registry`: every read and write, one transaction each
    ingest    the one registration path from a trained run dir
"""

from orchestrator.registry.ingest import NotTrainedError, ensure_registered, production_of, register_trained
from orchestrator.registry.records import (ACTIVE_STATES, EXCLUDED_FROM_LINEAGE, FINAL_STATES, HELD_STATES, SERVED_STATUSES,
                                           Command, CommandKind, Event, GenerationRecord, GenerationStatus, Lease,
                                           RolloutRecord, RolloutState)
from orchestrator.registry.schema import SCHEMA_VERSION
from orchestrator.registry.store import (IntegrityError, LeaseHeld, LeaseLost, Registry, RegistryError,
                                         StaleTransition, checkpoint_path, open_registry)
from orchestrator.rundir import registry_location, registry_path

__all__ = [
    "ACTIVE_STATES", "EXCLUDED_FROM_LINEAGE", "FINAL_STATES", "HELD_STATES", "SERVED_STATUSES", "SCHEMA_VERSION",
    "Command", "CommandKind", "Event", "GenerationRecord", "GenerationStatus", "Lease", "RolloutRecord",
    "RolloutState", "IntegrityError", "LeaseHeld", "LeaseLost", "Registry", "RegistryError", "StaleTransition",
    "NotTrainedError", "checkpoint_path", "ensure_registered", "open_registry", "production_of", "register_trained",
    "registry_location", "registry_path",
]
