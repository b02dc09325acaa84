"""Offline evaluation: pure metrics (`metrics`), the gate of a candidate against
production, decided by exact confidence bounds (`bounds`), and its registry record (`evaluate`), reports with plots (`report`)."""

from orchestrator.evaluation.evaluate import Check, Evaluation, EvaluationError, decide, evaluate, gate, gate_checks, render

__all__ = ["Check", "Evaluation", "EvaluationError", "decide", "evaluate", "gate", "gate_checks", "render"]
