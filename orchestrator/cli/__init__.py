"""The `graceful` command line (console script `graceful = orchestrator.cli:main`)."""

from orchestrator.cli.main import main

__all__ = ["main"]
