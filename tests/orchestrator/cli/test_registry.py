"""End to end on the CLI without Ray: `graceful train` (its Ray Train step swapped for the
same training in this process) records generations, `graceful evaluate` gates them with
exit codes 0/1/2 and writes the report, `graceful registry` shows the result."""

from __future__ import annotations

import json

import pytest
import yaml

from benchmarks.sample_report import train_in_process
from orchestrator.cli import main
from tests.orchestrator.evaluation.test_evaluate import TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A config whose g0..g2 were trained by `graceful train` (g3 untrained)."""
    import ray

    import orchestrator.chain as chain

    root = tmp_path_factory.mktemp("cli")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(root / "run"), **TINY}, sort_keys=False))
    mp = pytest.MonkeyPatch()
    # Everything of `graceful train` runs except the Ray Train job itself (and ray.init).
    mp.setattr(chain, "run_training", train_in_process)
    mp.setattr(ray, "is_initialized", lambda: True)
    try:
        for name in ("g0", "g1", "g2"):
            assert main(["train", str(path), "--generation", name, "--json"]) == 0
    finally:
        mp.undo()
    return path


def test_train_records_generations(trained, capsys):
    capsys.readouterr()
    assert main(["registry", str(trained), "list", "--json"]) == 0
    gens = json.loads(capsys.readouterr().out)
    assert [(g["name"], g["parent"], g["status"]) for g in gens] == [
        ("g0", None, "production"), ("g1", "g0", "trained"), ("g2", "g0", "trained")]  # parent: production when trained
    assert all(len(g["sha256"]) == 64 and g["checkpoint_uri"].endswith(f"generations/{g['name']}/model.pt")
               for g in gens)
    assert main(["registry", str(trained), "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("NAME") and "g0           production" in out


def test_evaluate_exit_codes_and_report(trained, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(trained), "--candidate", "g1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("g1 vs g0: PASS") and "[ok] NFR" in out and "report:" in out
    assert main(["evaluate", str(trained), "--candidate", "g2", "--json"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["passed"] is False and payload["status"] == "rejected" and payload["reasons"]
    assert payload["report"].endswith("reports/g2.md")
    run = trained.parent / "run" / "reports"
    assert {p.name for p in run.iterdir()} >= {"g1.md", "g2.md", "g2-flips.png", "g2-compat.png"}
    # bad usage: exit 2 with the reason
    for argv, msg in ((["--candidate", "g9"], "unknown generation 'g9'"),
                      (["--candidate", "g3"], "'g3' is not trained"),
                      (["--candidate", "g1", "--against", "g1"], "'g1' is the baseline itself"),
                      (["--candidate", "g1", "--against", "nope"], "unknown generation 'nope'")):
        assert main(["evaluate", str(trained), *argv]) == 2, argv
        assert msg in capsys.readouterr().err
    assert main(["evaluate", str(trained.parent / "missing.yaml"), "--candidate", "g1"]) == 2


def test_registry_show_lineage_events(trained, capsys):
    main(["evaluate", str(trained), "--candidate", "g2", "--no-report"])
    capsys.readouterr()
    assert main(["registry", str(trained), "show", "g2", "--json"]) == 0
    show = json.loads(capsys.readouterr().out)
    assert show["generation"]["status"] == "rejected" and show["evaluations"][-1]["passed"] is False
    assert (show["name"], show["parent"], show["status"]) == ("g2", "g0", "rejected")   # the documented contract
    assert show["lineage"] == ["g0", "g2"]
    assert [e["action"] for e in show["events"]][:1] == ["registered"]
    assert main(["registry", str(trained), "show", "g2"]) == 0
    text = capsys.readouterr().out
    assert "status rejected" in text and "FAIL" in text and "trained -> rejected" in text
    assert main(["registry", str(trained), "lineage", "g2", "--json"]) == 0
    assert [g["name"] for g in json.loads(capsys.readouterr().out)] == ["g0", "g2"]
    assert main(["registry", str(trained), "lineage", "g2"]) == 0
    assert "└─ g2" in capsys.readouterr().out
    assert main(["registry", str(trained), "events", "--subject", "g0", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert any(e["reason"] == "bootstrap: first generation" and e["actor"] == "train" for e in ev)
    assert main(["registry", str(trained), "show", "g9"]) == 2
    assert "unknown generation 'g9'" in capsys.readouterr().err


def test_tampered_checkpoint_fails_evaluate(tmp_path, capsys):
    from orchestrator.config import load_config
    from tests.orchestrator.evaluation.test_evaluate import make_chain

    path = make_chain(tmp_path, train=("g0", "g1"))
    f = load_config(path).run_dir / "generations" / "g0" / "model.pt"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # one byte changed
    f.write_bytes(bytes(data))
    assert main(["evaluate", str(path), "--candidate", "g1"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint of 'g0' was changed or truncated" in err and str(f.resolve()) in err
