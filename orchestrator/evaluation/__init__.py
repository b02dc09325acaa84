"""Offline evaluation: pure metrics (`metrics`), the gate of a candidate against
production and its registry record (`evaluate`), reports with plots (`report`)."""

from orchestrator.evaluation.evaluate import Evaluation, EvaluationError, evaluate, gate, gate_checks, render

__all__ = ["Evaluation", "EvaluationError", "evaluate", "gate", "gate_checks", "render"]
