"""`graceful demo`: the whole lifecycle on one machine (`run`), with simulated users whose
labels arrive later (`traffic`)."""

from orchestrator.demo.run import DemoInterrupted, run_demo

__all__ = ["DemoInterrupted", "run_demo"]
