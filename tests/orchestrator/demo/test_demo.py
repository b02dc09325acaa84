"""The demo's pure parts and its CLI's refusals (the real run: tests/integration/test_demo.py)."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import demo as cli_demo
from orchestrator.cli import main
from orchestrator.config import parse_config
from orchestrator.demo.run import GenerationSummary, format_summary, reset_run_dir, write_summary


def _cfg(tmp_path):
    return parse_config({"run_dir": str(tmp_path / "run"), "generations": [{"name": "g0"}, {"name": "g1"}]})


def test_summary_table_and_json(tmp_path):
    rows = [GenerationSummary("g0", 0.25, None, "promoted", top1_vs_gallery=0.72),
            GenerationSummary("g1", 0.0363, 0.0077, "promoted", against="g0", live_nfr=0.0081, top1_vs_gallery=0.8),
            GenerationSummary("g2", 0.158, 0.1357, "rolled_back", against="g1", live_nfr=0.1161)]
    text = format_summary(rows, 124.46)
    lines = text.splitlines()
    assert lines[0].split() == ["generation", "error", "%", "NFR", "%", "vs", "prod", "live", "NFR", "%",
                                "M(gk,", "gallery)", "%", "outcome"]
    # 0.0077 -> "0.77", 0.1161 -> "11.61": rates in %, two decimals; missing ones are "-".
    assert lines[2].split() == ["g0", "25.00", "-", "-", "72.00", "promoted"]
    assert lines[3].split() == ["g1", "3.63", "0.77", "(vs", "g0)", "0.81", "80.00", "promoted"]
    assert lines[4].split()[-1] == "rolled_back" and "11.61" in lines[4]
    assert lines[-1] == "wall time 124.5s"
    cfg = _cfg(tmp_path)
    path = write_summary(cfg, rows, 124.46)
    data = json.loads(path.read_text())
    assert data["wall_seconds"] == 124.46
    assert [(g["name"], g["outcome"]) for g in data["generations"]] == [("g0", "promoted"), ("g1", "promoted"),
                                                                       ("g2", "rolled_back")]
    assert {"name", "error", "nfr", "outcome"} <= set(data["generations"][0])


def test_fresh_refuses_a_directory_that_is_not_a_run(tmp_path):
    cfg = _cfg(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="does not look like a graceful run directory"):
        reset_run_dir(cfg)
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"
    (tmp_path / "run" / "generations").mkdir()
    reset_run_dir(cfg)
    assert not (tmp_path / "run").exists()


def test_demo_cli_refuses_bad_config_and_missing_default(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generations: [{name: g0, train: {lr: -1}}]\n")
    assert main(["demo", str(bad)]) == 2
    assert "generations[0].train.lr" in capsys.readouterr().err
    monkeypatch.setattr(cli_demo, "DEFAULT_CONFIGS", (tmp_path / "nope.yaml",))
    assert main(["demo"]) == 2
    assert "pass a config file" in capsys.readouterr().err


def test_a_generation_that_failed_before_its_gate_shows_dashes_and_its_reason(tmp_path):
    rows = [GenerationSummary("g0", 0.25, None, "promoted"),
            GenerationSummary("g1", None, None, "failed", reasons=["train failed: RuntimeError: out of memory"])]
    assert format_summary(rows, 1.0).splitlines()[3].split() == ["g1", "-", "-", "-", "-", "failed"]
    data = json.loads(write_summary(_cfg(tmp_path), rows, 1.0).read_text())
    assert data["generations"][1]["error"] is None
    assert data["generations"][1]["reasons"] == ["train failed: RuntimeError: out of memory"]


def test_run_demo_refuses_a_shared_registry(tmp_path):
    from orchestrator.demo.run import run_demo

    cfg = parse_config({"run_dir": str(tmp_path / "run"), "generations": [{"name": "g0"}],
                        "registry": {"url": "postgresql://graceful@db/graceful"}})
    with pytest.raises(ValueError, match="registry.url: the demo keeps its registry in run_dir"):
        run_demo(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written
