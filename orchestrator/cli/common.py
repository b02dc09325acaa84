"""What every `graceful` command shares: exit codes, the usage error, config loading,
`--json` output. Exit codes are a contract: 0 ok, 1 the action failed or a gate failed,
2 bad usage or bad config, 3 the gate could not decide."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Optional

from orchestrator.config import ConfigError, RunConfig, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INCONCLUSIVE = 3  # `graceful evaluate`: the offline gate could not decide (too little test data)


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


def load_or_exit(path: str) -> RunConfig:
    """Load a config for a command; print every problem and exit 2 when it is bad."""
    try:
        return load_config(path)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def emit(payload: Any, as_json: bool, render: Optional[Callable[[Any], str]] = None) -> None:
    """Print `payload` as JSON, or as text through `render`."""
    if as_json:
        print(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        print(render(payload) if render else payload)


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (e.g. config/demo.yaml)")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
