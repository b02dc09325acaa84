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
