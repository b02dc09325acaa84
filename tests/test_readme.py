"""The README is the reference: its commands, metric names and benchmark outputs exist."""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.rollout import metric_names as controller_metrics
from serving import metric_names as router_metrics

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_exported_metric_is_documented():
    missing = [n for n in router_metrics.EXPORTED + controller_metrics.EXPORTED if n not in README]
    assert not missing, missing


def test_the_two_commands_open_the_readme():
    block = README[README.index("```bash"):README.index("```", README.index("```bash") + 3)]
    commands = [line.split("#")[0].strip() for line in block.splitlines()[1:] if line.strip()]
    assert commands == ["bash scripts/install.sh && .venv/bin/graceful demo", "bash scripts/test.sh"]
    assert (ROOT / "scripts" / "install.sh").is_file() and (ROOT / "scripts" / "test.sh").is_file()


def test_benchmark_scripts_and_results_named_in_the_readme_exist():
    scripts = set(re.findall(r"benchmarks[./](\w+)", README)) - {"results"}
    assert {"nfr_pareto", "compat_retrieval", "train_overhead", "serving_overhead", "lqf", "chain_tax",
            "rollout_sim"} <= scripts
    for name in scripts:
        assert (ROOT / "benchmarks" / f"{name}.py").is_file(), name
    for path in re.findall(r"benchmarks/results/[\w.]+\.(?:json|png)", README):
        assert (ROOT / path).is_file(), path
