"""graceful's Python API (`orchestrator.api`): what the CLI does, from Python.

    Run               a run directory driven from Python: train, evaluate, serve, rollout
    Generation        a trained generation (checkpoint, sha256, status, metrics)
    Served            a router started by Run.serve (url, client; a context manager)
    train_compatible  train one generation of a run in one call
    evaluate          the offline gate of two models on test arrays, recorded nowhere

The errors are the typed errors the CLI reports, re-exported here.
"""

from orchestrator.api import Generation, Run, Served, evaluate, factory_path, train_compatible
from orchestrator.chain import ChainError
from orchestrator.config import ConfigError
from orchestrator.evaluation.evaluate import Evaluation, EvaluationError
from orchestrator.registry import RegistryError
from orchestrator.rollout.start import RolloutRefused
from workers.checkpoint import CheckpointError
from workers.data import DataError
from workers.factory import FactoryError

__all__ = [
    "Run", "Generation", "Served", "train_compatible", "evaluate", "factory_path", "Evaluation",
    "ConfigError", "DataError", "FactoryError", "ChainError", "EvaluationError", "RolloutRefused",
    "CheckpointError", "RegistryError",
]
