"""`graceful labels import CONFIG FILE` on a real SQLite prediction log: requests logged
(as a router logs them) join from a file; a file with a bad row joins nothing (exit 2);
a memory log is refused (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import load_config
from serving.predlog import open_log
from tests.orchestrator.evaluation.test_evaluate import TINY


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **TINY}, sort_keys=False))
    return path


def _log_requests(cfg_path, n: int) -> list[str]:
    log = open_log(load_config(cfg_path).serving)
    rids = [f"req-{i}" for i in range(n)]
    for i, rid in enumerate(rids):
        log.record(rid, "g0", {"g0": ("0" * 64, np.array([i % 3, 1]))})
        log.add_prediction(rid, "g1", "1" * 64, np.array([i % 3, 2]))
    log.close()
    return rids


def test_labels_import_joins_a_file_and_says_how_many(config, tmp_path, capsys):
    """10 logged requests; the file labels 8 of them (labels = production's), one twice,
    and one id never served: 8 joined, 1 duplicate, 1 unknown; g1 is wrong on every
    second row: 8 negative flips in 16 labelled samples."""
    rids = _log_requests(config, 10)
    rows = [{"request_id": r, "labels": [i % 3, 1]} for i, r in enumerate(rids[:8])]
    rows += [rows[0], {"request_id": "never-served", "labels": [1]}]
    f = tmp_path / "labels.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    capsys.readouterr()
    assert main(["labels", "import", str(config), str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["joined"] == 8 and out["outcomes"]["duplicate"] == 1 and out["outcomes"]["unknown"] == 1
    assert out["labelled_samples"] == 16
    log = open_log(load_config(config).serving)
    gens, feedback = log.counters()
    log.close()
    assert gens["g1"]["labelled"] == 16 and gens["g1"]["negative_flips"] == 8 and feedback["joined"] == 8
    # the same file again: every request is a duplicate now, nothing is counted twice
    assert main(["labels", "import", str(config), str(f)]) == 0
    assert "0 of 10 labelled requests joined" in capsys.readouterr().out


def test_a_file_with_a_bad_row_joins_nothing_and_exits_2(config, tmp_path, capsys):
    rids = _log_requests(config, 2)
    f = tmp_path / "labels.csv"
    f.write_text(f"request_id,labels\n{rids[0]},0 1\n{rids[1]},x\n")
    assert main(["labels", "import", str(config), str(f)]) == 2
    assert "labels.csv: line 3: labels" in capsys.readouterr().err
    log = open_log(load_config(config).serving)
    assert log.counters()[1]["joined"] == 0
    log.close()


def test_a_memory_log_cannot_be_imported_into(tmp_path, capsys):
    path = tmp_path / "mem.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **TINY,
                                    "serving": {"prediction_log": "memory"}}, sort_keys=False))
    f = tmp_path / "l.jsonl"
    f.write_text('{"request_id": "a", "labels": [1]}\n')
    assert main(["labels", "import", str(path), str(f)]) == 2
    assert "/v1/feedback/batch" in capsys.readouterr().err
