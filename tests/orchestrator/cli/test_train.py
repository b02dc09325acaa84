"""`graceful train` on a run directory whose generations are already trained (no Ray:
a trained generation with the same config hash is not trained again)."""

from __future__ import annotations

import hashlib
import json

from orchestrator.chain import Constraints, training_hash
from orchestrator.cli import main
from orchestrator.config import load_config


def _config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(f"run_dir: {tmp_path / 'run'}\ngenerations: [{{name: g0}}, {{name: g1}}]\n")
    return p


def _fake_trained(cfg, name, training_hash):
    d = cfg.run_dir / "generations" / name
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(b"hashed, never loaded, by this command")
    sha = hashlib.sha256((d / "model.pt").read_bytes()).hexdigest()
    (d / "metrics.json").write_text(json.dumps({"name": name, "training_hash": training_hash,
                                                "test_accuracy": 0.5, "sha256": sha}))


def _first(cfg):
    """The training hash of a first generation (nothing to be constrained against)."""
    return training_hash(cfg, "g0", Constraints("g0", None))


def test_trained_generation_is_not_retrained(tmp_path, capsys):
    path = _config(tmp_path)
    cfg = load_config(str(path))
    _fake_trained(cfg, "g0", _first(cfg))
    assert main(["train", str(path), "--generation", "g0"]) == 0
    assert "g0 is trained already with this config (test_acc 0.5000)" in capsys.readouterr().out
    assert main(["train", str(path), "--generation", "g0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "g0"


def test_every_generation_trained(tmp_path, capsys):
    path = _config(tmp_path)
    cfg = load_config(str(path))
    for name in ("g0", "g1"):
        _fake_trained(cfg, name, training_hash(cfg, name, Constraints(name, None)))
    assert main(["train", str(path)]) == 0
    assert "every generation" in capsys.readouterr().out


def test_changing_serving_or_rollout_does_not_retrain(tmp_path, capsys):
    path = _config(tmp_path)
    cfg = load_config(str(path))
    _fake_trained(cfg, "g0", _first(cfg))
    path.write_text(path.read_text() + "serving: {port: 9002}\nrollout: {nfr_limit: 0.03}\n")
    assert main(["train", str(path), "--generation", "g0"]) == 0
    assert "g0 is trained already with this config" in capsys.readouterr().out


def test_a_checkpoint_that_does_not_match_its_metrics_is_not_trained(tmp_path, capsys):
    """A crash between writing model.pt and metrics.json: the old metrics' hash no longer
    describes the file, so the generation counts as untrained (and is trained again)."""
    from orchestrator.chain import trained_with_this_config

    path = _config(tmp_path)
    cfg = load_config(str(path))
    _fake_trained(cfg, "g0", _first(cfg))
    assert trained_with_this_config(cfg, "g0") is not None
    (cfg.run_dir / "generations" / "g0" / "model.pt").write_bytes(b"half of a newer checkpoint")
    assert trained_with_this_config(cfg, "g0") is None


def test_evaluate_exits_3_when_the_gate_cannot_decide(tmp_path, capsys):
    """`graceful evaluate` on a gate whose bounds straddle a limit (g1's NFR on these 539
    rows, against max_nfr 0.02): exit 3, the verdict and each check's bounds in the text
    and the --json output, and the candidate's status unchanged. The chain is trained in
    this process (no Ray), as in tests/orchestrator/evaluation/test_evaluate.py."""
    from orchestrator.cli.common import EXIT_INCONCLUSIVE
    from tests.orchestrator.evaluation.test_evaluate import TINY, make_chain

    path = make_chain(tmp_path, train=("g0", "g1"), gates={**TINY["gates"], "max_nfr": 0.02})
    capsys.readouterr()
    assert EXIT_INCONCLUSIVE == 3
    assert main(["evaluate", str(path), "--candidate", "g1", "--no-report"]) == 3
    out = capsys.readouterr().out
    assert out.startswith("g1 vs g0: INCONCLUSIVE") and "[??] NFR" in out and "bounds [" in out
    assert "gates.allow_inconclusive" in out
    assert main(["evaluate", str(path), "--candidate", "g1", "--no-report", "--json"]) == 3
    payload = json.loads(capsys.readouterr().out)
    assert (payload["verdict"], payload["passed"], payload["status"]) == ("inconclusive", False, "trained")
    nfr = next(c for c in payload["checks"] if c["key"] == "max_nfr")
    assert nfr["verdict"] == "inconclusive" and nfr["lower"] <= 0.02 < nfr["upper"] and nfr["limit"] == 0.02
    # the same chain under looser limits passes (exit 0); the registry shows both verdicts
    loose = tmp_path / "loose.yaml"
    import yaml

    raw = yaml.safe_load(path.read_text())
    loose.write_text(yaml.safe_dump({**raw, "gates": TINY["gates"]}, sort_keys=False))
    assert main(["evaluate", str(loose), "--candidate", "g1", "--no-report"]) == 0
    capsys.readouterr()
    assert main(["registry", str(loose), "show", "g1"]) == 0
    text = capsys.readouterr().out
    assert "INCONCLUSIVE (NFR" in text and "PASS (NFR" in text
