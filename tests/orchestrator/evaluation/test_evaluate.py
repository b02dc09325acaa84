"""The offline gate: pure `gate` on constructed metrics, and `evaluate` on a tiny chain
trained in this process on scikit-learn digits (no Ray), recorded in a real registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.config import GatesSpec, load_config
from orchestrator.evaluation.evaluate import (EvaluationError, decide, evaluate, evaluation_metrics, gate, gate_checks,
                                              load_verified)
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

def _counts(n: int, errors: int, b: int, c: int, classes: int = 10, queries: int = 0, lost: int = 0,
            gained: int = 0, hits: float = 0.8, **over):
    """Metrics of a constructed test set: n rows over `classes` classes, production wrong
    on the first `errors`; the candidate turns b of production's right rows wrong (spread
    over classes) and c of its wrong rows right; with `queries`, per-query retrieval hits
    where the candidate loses `lost` of production's hits and gains `gained` misses."""
    y = np.arange(n) % classes
    old = y.copy()
    old[:errors] = (y[:errors] + 1) % classes
    new = old.copy()
    new[errors:errors + b] = (y[errors:errors + b] + 1) % classes
    new[:c] = y[:c]
    pair = None
    if queries:
        pp = np.arange(queries) < round(hits * queries)
        cp = pp.copy()
        cp[:lost] = False
        cp[len(cp) - gained:] = True if gained else cp[len(cp) - gained:]
        assert (pp & ~cp).sum() == lost and (~pp & cp).sum() == gained
        pair = (cp, pp)
    m = evaluation_metrics(y, old, new, classes, None if pair is None else float(pair[0].mean()),
                           None if pair is None else float(pair[1].mean()), n_boot=20, hits=pair)
    return {**m, **over}


def _by_key(checks):
    return {c.key: c for c in checks}


def test_one_extra_error_in_171_rows_is_inconclusive_not_a_failure():
    """The motivating case: 171 held-out rows, production wrong on 20, the candidate on
    the same 20 and one more (b = 1, c = 0): error change +0.58 points, which the point
    estimate gate rejected. Four checks at alpha 0.05: 0.0125 a side each; pi from 1 of
    1 is in (0.0125, 1), so the change is in ((2 * 0.0125 - 1) / 171, 1 / 171) =
    (-0.0057, +0.0058): it straddles max_error_increase 0 -> inconclusive."""
    m = _counts(171, 20, b=1, c=0, queries=85, hits=0.9)
    assert m["error_change"] == pytest.approx(1 / 171)
    verdict, reasons, checks = decide(m, GatesSpec())
    err = _by_key(checks)["max_error_increase"]
    assert verdict == "inconclusive" and err.verdict == "inconclusive"
    assert err.alpha == pytest.approx(0.0125)
    assert (err.lower, err.upper) == pytest.approx(((2 * 0.0125 - 1) / 171, 1 / 171))
    assert "too small to decide" in err.reason and not any(c.verdict == "fail" for c in checks)
    assert gate(m, GatesSpec()) == (False, reasons)


def test_a_clear_regression_fails():
    """2000 rows, production 100 wrong; the candidate loses 150 rows and gains 10: error
    +7 points, NFR 7.5%, both lower bounds beyond their limits."""
    verdict, reasons, checks = decide(_counts(2000, 100, b=150, c=10), GatesSpec(require_bct=False))
    by = _by_key(checks)
    assert verdict == "fail"
    assert by["max_error_increase"].verdict == "fail" and by["max_error_increase"].lower > 0.05
    assert by["max_nfr"].verdict == "fail" and by["max_nfr"].lower > 0.02
    assert any("FAIL, lower bound" in r for r in reasons)


def test_a_clear_improvement_passes():
    """5000 rows, production 500 wrong; the candidate fixes 300 and breaks 5, and in
    retrieval gains 100 queries and loses 10 of 2500: every upper bound within its limit
    and the retrieval difference's lower bound above 0."""
    m = _counts(5000, 500, b=5, c=300, queries=2500, lost=10, gained=100)
    verdict, reasons, checks = decide(m, GatesSpec())
    assert verdict == "pass" and reasons == [], reasons
    assert [c.key for c in checks] == ["max_error_increase", "max_nfr", "max_class_nfr", "require_bct"]
    assert all(c.ok and c.lower <= c.value <= c.upper for c in checks)
    assert _by_key(checks)["require_bct"].lower > 0
    assert gate(m, GatesSpec()) == (True, [])


def test_alpha_is_split_over_the_checks_that_run():
    m = _counts(1000, 100, b=2, c=50, queries=500, gained=20)
    for gates, k in ((GatesSpec(), 4), (GatesSpec(max_nfi=0.5), 5), (GatesSpec(require_bct=False, alpha=0.1), 3)):
        checks = gate_checks(m, gates)
        assert len(checks) == k and all(c.alpha == pytest.approx(gates.alpha / k) for c in checks)


@pytest.mark.parametrize("kw, gates, key, fragment", [
    ({"b": 150, "c": 10}, {"max_nfr": 0.5, "max_class_nfr": 1.0}, "max_error_increase", "lower bound +0.0"),
    ({"b": 150, "c": 150}, {"max_class_nfr": 1.0}, "max_nfr", "lower bound 0.0"),
    ({"b": 150, "c": 140}, {"max_nfr": 0.5, "max_class_nfr": 1.0, "max_error_increase": 0.1, "max_nfi": 0.2},
     "max_nfi", "NFI (150 of the candidate's"),
    ({"b": 150, "c": 150, "classes": 2}, {"max_nfr": 0.5, "max_class_nfr": 0.05}, "max_class_nfr",
     "worst per-class NFR (class"),
    ({"b": 0, "c": 0, "queries": 1000, "lost": 200}, {}, "require_bct", "upper bound -0.1"),
])
def test_gate_fails_each_key(kw, gates, key, fragment):
    m = _counts(2000, 200, **{"queries": 1000, **kw})  # retrieval: a tie unless kw says otherwise
    verdict, reasons, checks = decide(m, GatesSpec(**gates))
    failed = [c for c in checks if c.verdict == "fail"]
    assert verdict == "fail" and [c.key for c in failed] == [key], reasons
    assert fragment in failed[0].reason and failed[0].lower > failed[0].limit or key == "require_bct"


def test_not_comparable_embeddings_fail_require_bct_and_bct_can_be_off():
    m = _counts(5000, 500, b=5, c=300)  # no retrieval: m_candidate_production None
    verdict, reasons, _ = decide(m, GatesSpec())
    assert verdict == "fail" and len(reasons) == 1 and "not comparable" in reasons[0]
    assert decide(m, GatesSpec(require_bct=False))[0] == "pass"


def test_limits_are_inclusive():
    """No negative flip in 171 rows at 0.0125: NFR's upper bound is 1 - 0.0125^(1/171) =
    0.0253, a pass against a limit of exactly that."""
    m = _counts(171, 20, b=0, c=0)
    hi = 1 - 0.0125 ** (1 / 171)
    nfr = _by_key(gate_checks(m, GatesSpec(require_bct=False, alpha=0.0375, max_nfr=hi)))["max_nfr"]
    assert nfr.upper == pytest.approx(hi) and nfr.verdict == "pass"


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
        assert [e["metrics"]["verdict"] for e in evals[-2:]] == ["pass", "fail"] == [good.verdict, bad.verdict]
        assert evals[-1]["metrics"]["checks"] == [c.as_dict() for c in bad.checks]
        assert (reg.generation("g1").status, reg.generation("g2").status) == ("trained", "rejected")
        assert reg.events("g2")[-1].reason.startswith(f"offline gate failed (evaluation {bad.evaluation_id})")
    # against a named baseline; embeddings of the same size are comparable
    vs1 = evaluate(cfg, "g2", against="g1", n_boot=50)
    assert vs1.baseline == "g1" and vs1.metrics["m_candidate_production"] is not None
    json.dumps(vs1.as_dict())  # the CLI's --json payload serialises


def test_an_inconclusive_evaluation_is_recorded_and_changes_no_status(chain):
    """Limits inside the bounds of the measured numbers (g1's NFR bounds straddle 0.02 on
    these 539 rows; g2's error change straddles 0.1): each verdict is inconclusive, the
    record says so, and 'trained' stays 'trained', 'rejected' stays 'rejected'."""
    cfg = load_config(chain)
    tight = cfg.model_copy(update={"gates": cfg.gates.model_copy(update={"max_nfr": 0.02})})
    loose = cfg.model_copy(update={"gates": cfg.gates.model_copy(
        update={"max_error_increase": 0.1, "max_nfr": 0.13, "max_class_nfr": 0.5})})
    evaluate(cfg, "g2", n_boot=20)  # rejected, whatever ran before
    for c, name, status in ((tight, "g1", "trained"), (loose, "g2", "rejected")):
        ev = evaluate(c, name, n_boot=20)
        assert ev.verdict == "inconclusive" and not ev.passed and ev.status == status, ev.reasons
        assert ev.reasons and all("INCONCLUSIVE" in r for r in ev.reasons)
        with Registry(registry_path(cfg)) as reg:
            rec = reg.evaluations(name)[-1]
            assert (rec["passed"], rec["metrics"]["verdict"]) == (False, "inconclusive")
            assert reg.generation(name).status == status
    assert evaluate(cfg, "g1", n_boot=20).verdict == "pass"  # g1's latest evaluation passes again


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


def test_query_generations_are_measured_in_the_gallery_models_gallery_not_gated(chain):
    """retrieval.query_generations [g2, g3]: the evaluation reports M(g2, g0) (g2's query
    embeddings searched among the gallery model g0's) computed as the hits of the test
    split's halves, and None for g3, which is not trained; the verdict is the same as
    without them, and the rendered verdict shows them."""
    from orchestrator.evaluation.evaluate import render
    from workers.data import load_dataset
    from workers.training import predict

    cfg = load_config(chain)
    plain = evaluate(cfg, "g1", n_boot=20, record=False)
    het_cfg = cfg.model_copy(update={"retrieval": cfg.retrieval.model_copy(update={"query_generations": ["g2", "g3"]})})
    ev = evaluate(het_cfg, "g1", n_boot=20, record=False)
    het = ev.metrics["query_generations"]
    ds = load_dataset(cfg.data)
    half = len(ds.test.y) // 2
    with Registry(registry_path(cfg)) as reg:
        gal = predict(load_verified(reg, "g0"), ds.test.x[half:])[0]
        q = predict(load_verified(reg, "g2"), ds.test.x[:half])[0]
    from orchestrator.evaluation.metrics import retrieval_top1

    assert het["gallery"] == "g0" and het["top1"]["g3"] is None
    assert het["top1"]["g2"] == pytest.approx(retrieval_top1(q, ds.test.y[:half], gal, ds.test.y[half:]))
    assert ev.verdict == plain.verdict and "query_generations" not in plain.metrics
    assert f"M(g2, g0) {100 * het['top1']['g2']:.1f} %" in render(ev) and "M(g3, g0) n/a" in render(ev)
