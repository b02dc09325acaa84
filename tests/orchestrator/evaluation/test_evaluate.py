"""The offline gate: pure `gate` on constructed metrics, and `evaluate` on a tiny chain
trained in this process on scikit-learn digits (no Ray), recorded in a real registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.config import GatesSpec, load_config
from orchestrator.evaluation.evaluate import EvaluationError, evaluate, evaluation_metrics, gate, gate_checks, load_verified
from orchestrator.registry import IntegrityError, Registry, register_trained, registry_path

# g1 is a plain improvement; g2 learns from 60% random labels and must fail. Gates are
# loose enough for an honest tiny g1 to pass, and require_bct is off (tiny MLPs without
# BCT are not compatible; the pure gate tests cover require_bct).
TINY = {
    "data": {"source": "digits", "seed": 0, "test_fraction": 0.3, "val_fraction": 0.1},
    "generations": [
        {"name": "g0", "train_fraction": 0.3, "arch": {"type": "mlp", "width": 32, "depth": 1, "embed_dim": 16},
         "train": {"steps": 150, "batch_size": 64, "eval_every": 150}},
        {"name": "g1", "arch": {"type": "mlp", "width": 64, "depth": 1, "embed_dim": 16},
         "train": {"steps": 150, "batch_size": 64, "eval_every": 150, "seed": 1},
         "compat": {"focal_distillation": {"weight": 1.0}}},
        {"name": "g2", "label_noise": 0.6, "arch": {"type": "mlp", "width": 64, "depth": 1, "embed_dim": 16},
         "train": {"steps": 150, "batch_size": 64, "eval_every": 150, "seed": 2}},
        {"name": "g3", "arch": {"type": "mlp", "width": 32, "depth": 1, "embed_dim": 16}},
    ],
    "gates": {"max_error_increase": 0.02, "max_nfr": 0.05, "max_class_nfr": 0.25, "require_bct": False},
}


def make_chain(root: Path, train: tuple[str, ...] = ("g0", "g1", "g2"), **overrides) -> Path:
    """Write the tiny config under `root` and train `train` in process (g3 stays untrained)."""
    raw = {"run_dir": str(root / "run"), **TINY, **overrides}
    path = root / "tiny.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(path)
    from orchestrator.chain import build_job
    from benchmarks.sample_report import train_in_process

    for name in train:
        train_in_process(build_job(cfg, name, verbose=False), log=lambda s: None)
        register_trained(cfg, name)
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return make_chain(tmp_path_factory.mktemp("chain"))


# --- pure gate ------------------------------------------------------------------------------

def _metrics(**kw):
    base = {"n": 100, "error_baseline": 0.10, "error_candidate": 0.08, "error_change": -0.02, "nfr": 0.01,
            "nfi": 0.125, "pfr": 0.03, "worst_class": 3, "worst_class_nfr": 0.05,
            "m_candidate_production": 0.90, "m_production_production": 0.85}
    return {**base, **kw}


def test_gate_passes_a_good_candidate():
    ok, reasons = gate(_metrics(), GatesSpec())
    assert ok and reasons == []
    assert [c.key for c in gate_checks(_metrics(), GatesSpec())] == [
        "max_error_increase", "max_nfr", "max_class_nfr", "require_bct"]  # max_nfi unset: not checked


@pytest.mark.parametrize("kw, gates, fragment", [
    ({"error_candidate": 0.12, "error_change": 0.02}, {}, "error change (0.1000 -> 0.1200) 0.0200 > max_error_increase 0.0000"),
    ({"nfr": 0.03}, {}, "NFR 0.0300 > max_nfr 0.0200"),
    ({"nfi": 0.5}, {"max_nfi": 0.4}, "NFI 0.5000 > max_nfi 0.4000"),
    ({"worst_class_nfr": 0.2, "worst_class": 7}, {}, "worst per-class NFR (class 7) 0.2000 > max_class_nfr 0.1000"),
    ({"m_candidate_production": 0.85}, {}, "M(candidate, production) 0.8500 <= M(production, production) 0.8500"),
    ({"m_candidate_production": None}, {}, "not comparable"),
])
def test_gate_fails_each_key(kw, gates, fragment):
    ok, reasons = gate(_metrics(**kw), GatesSpec(**gates))
    assert not ok and len(reasons) == 1 and fragment in reasons[0]


def test_gate_limits_are_inclusive_and_bct_can_be_off():
    """NFR 2/100 = 0.02 is at max_nfr 0.02: a pass, even though 0.1 + 0.1 style sums drift."""
    ok, _ = gate(_metrics(nfr=0.02, worst_class_nfr=0.1, error_change=0.0), GatesSpec())
    assert ok
    ok, reasons = gate(_metrics(m_candidate_production=0.1), GatesSpec(require_bct=False))
    assert ok and reasons == []
    ok, reasons = gate(_metrics(nfr=0.5, error_change=0.3, m_candidate_production=0.0), GatesSpec())
    assert not ok and len(reasons) == 3


def test_evaluation_metrics_by_hand():
    """y = 0 0 1 1 2 2; old = 0 0 1 0 2 1 (2 wrong); new = 0 1 1 1 2 2 (1 wrong).
    Negative flip at index 1 (old right, new wrong): NFR 1/6; positive flips at 3 and 5:
    PFR 2/6; errors 2/6 -> 1/6, change -1/6; NFI = (1/6)/(1/6) = 1; class 0 has 1 flip in
    2 samples: worst class 0 at 0.5."""
    y = np.array([0, 0, 1, 1, 2, 2])
    old = np.array([0, 0, 1, 0, 2, 1])
    new = np.array([0, 1, 1, 1, 2, 2])
    m = evaluation_metrics(y, old, new, 3, 0.9, 0.8, n_boot=50)
    assert m["nfr"] == pytest.approx(1 / 6) and m["pfr"] == pytest.approx(2 / 6)
    assert m["error_change"] == pytest.approx(-1 / 6) and m["nfi"] == pytest.approx(1.0)
    assert (m["worst_class"], m["worst_class_nfr"]) == (0, 0.5)
    assert (m["m_candidate_production"], m["m_production_production"]) == (0.9, 0.8)


# --- evaluate on a trained chain ------------------------------------------------------------

def test_first_generation_bootstraps_production(chain):
    cfg = load_config(chain)
    with Registry(registry_path(cfg)) as reg:
        assert reg.production().name == "g0"
        boot = [e for e in reg.events("g0") if e.action == "status"]
        assert [(e.actor, e.reason, e.to_state) for e in boot] == [("train", "bootstrap: first generation", "production")]
        assert [g.name for g in reg.lineage("g2")] == ["g0", "g2"]   # g1 was never production
        g1 = reg.generation("g1")
        assert g1.arch == "mlp" and g1.config_hash == cfg.config_hash() and "history" not in g1.metrics
        assert g1.checkpoint_uri == str((cfg.run_dir / "generations" / "g1" / "model.pt").resolve())


def test_evaluate_pass_and_fail_are_recorded(chain):
    from workers.data import load_dataset
    from workers.training import predict

    cfg = load_config(chain)
    good = evaluate(cfg, "g1", n_boot=100)
    assert good.baseline == "g0" and good.passed, good.reasons
    bad = evaluate(cfg, "g2", n_boot=100)
    assert not bad.passed and any("max_error_increase" in r or "max_nfr" in r for r in bad.reasons)
    # the numbers agree with predictions recomputed here from the verified checkpoints
    ds = load_dataset(cfg.data)
    with Registry(registry_path(cfg)) as reg:
        p0 = predict(load_verified(reg, "g0"), ds.test.x)[1].argmax(1)
        p2 = predict(load_verified(reg, "g2"), ds.test.x)[1].argmax(1)
        y = ds.test.y
        assert bad.metrics["nfr"] == pytest.approx(np.mean((p0 == y) & (p2 != y)))
        assert bad.metrics["error_change"] == pytest.approx(np.mean(p2 != y) - np.mean(p0 != y))
        assert np.sum(bad.flip_matrix) == round(bad.metrics["nfr"] * len(y))
        evals = reg.evaluations()
        assert [(e["candidate"], e["baseline"], e["passed"]) for e in evals][-2:] == [("g1", "g0", True), ("g2", "g0", False)]
        assert evals[-1]["reasons"] == bad.reasons and evals[-1]["metrics"]["nfr"] == bad.metrics["nfr"]
        assert (reg.generation("g1").status, reg.generation("g2").status) == ("trained", "rejected")
        assert reg.events("g2")[-1].reason.startswith(f"offline gate failed (evaluation {bad.evaluation_id})")
    # against a named baseline; embeddings of the same size are comparable
    vs1 = evaluate(cfg, "g2", against="g1", n_boot=50)
    assert vs1.baseline == "g1" and vs1.metrics["m_candidate_production"] is not None
    json.dumps(vs1.as_dict())  # the CLI's --json payload serialises


def test_evaluate_refuses_bad_requests(chain):
    cfg = load_config(chain)
    with pytest.raises(EvaluationError, match="unknown generation 'g9'"):
        evaluate(cfg, "g9")
    with pytest.raises(EvaluationError, match="'g3' is not trained"):
        evaluate(cfg, "g3")
    with pytest.raises(EvaluationError, match="'g0' is the baseline itself"):
        evaluate(cfg, "g0")


def test_tampered_checkpoint_is_refused_and_nothing_recorded(tmp_path):
    path = make_chain(tmp_path, train=("g0", "g1"))
    cfg = load_config(path)
    f = cfg.run_dir / "generations" / "g1" / "model.pt"
    data = f.read_bytes()
    f.write_bytes(data[:-100])  # truncated
    with pytest.raises(IntegrityError, match=rf"{f.resolve()} has sha256 [0-9a-f]{{64}}, the registry recorded"):
        evaluate(cfg, "g1")
    with Registry(registry_path(cfg)) as reg:
        assert reg.evaluations() == [] and reg.generation("g1").status == "trained"
    f.write_bytes(data)
    assert evaluate(cfg, "g1", n_boot=50).evaluation_id is not None


def test_record_trained_backfills_and_replaces(tmp_path):
    """A run dir trained before the registry existed: evaluating g2 registers g0..g2 first."""
    path = make_chain(tmp_path, train=("g0", "g1"))
    cfg = load_config(path)
    registry_path(cfg).unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(registry_path(cfg)) + suffix).unlink(missing_ok=True)
    ev = evaluate(cfg, "g1", n_boot=50)
    with Registry(registry_path(cfg)) as reg:
        assert [g.name for g in reg.generations()] == ["g0", "g1"]
        assert reg.production().name == "g0" and ev.baseline == "g0"
        # a retrained g1 (new bytes, metrics.json updated) replaces its record
        from benchmarks.sample_report import train_in_process
        from orchestrator.chain import build_job

        old_sha = reg.generation("g1").sha256
        job = build_job(cfg, "g1", verbose=False)
        job = type(job)(**{**job.__dict__, "generation": job.generation.model_copy(
            update={"train": job.generation.train.model_copy(update={"seed": 9})})})
        train_in_process(job, log=lambda s: None)
        new = register_trained(cfg, "g1", registry=reg)
        assert new.sha256 != old_sha and new.status == "trained"
        assert reg.events("g1")[-1].action == "replaced"
        # model.pt changed behind metrics.json's back: refused
        f = cfg.run_dir / "generations" / "g1" / "model.pt"
        f.write_bytes(f.read_bytes() + b"x")
        with pytest.raises(IntegrityError, match="does not match its metrics.json"):
            register_trained(cfg, "g1", registry=reg)
