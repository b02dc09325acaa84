"""Training on real Ray Train workers: DDP over 2 CPU workers, BCT chain, a worker killed
mid-run, an interrupted run resumed by rerunning the same job, and a heterogeneous
(MLP query, CNN gallery) pair distilled from ensemble references trained as Ray tasks."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from orchestrator.chain import build_job, read_metrics, train_generation
from orchestrator.cli import main
from orchestrator.config import parse_config
from orchestrator.evaluation.metrics import retrieval_top1
from workers.checkpoint import load_model
from workers.data import generation_train_split, load_dataset
from workers.interpolation import choose_alpha, interpolate_state
from workers.train import STATE_FILE, TrainResult, build_targets, run_training, with_fault
from workers.training import predict


def _raw(tmp_path, workers=2, max_failures=2, steps=200) -> dict:
    return {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "digits", "test_fraction": 0.4},
        "generations": [
            {"name": "g0", "train_fraction": 0.3, "arch": {"type": "mlp", "width": 32, "depth": 2, "embed_dim": 32},
             "train": {"steps": steps, "batch_size": 64, "eval_every": 50}},
            {"name": "g1", "arch": {"type": "mlp", "width": 64, "depth": 2, "embed_dim": 32},
             "train": {"steps": 3 * steps, "batch_size": 64, "eval_every": 150, "seed": 1},
             "compat": {"bct": {"weight": 3.0},
                        "focal_distillation": {"form": "kl", "beta": 1.0, "weight": 0.5}}},
        ],
        "scaling": {"num_workers": workers, "max_failures": max_failures},
    }


def _cfg(tmp_path, **kw):
    return parse_config(_raw(tmp_path, **kw))


def test_chain_on_two_ddp_workers_is_compatible(ray_session, tmp_path, capsys):
    cfg = _cfg(tmp_path)
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path)))
    # The CLI trains the first untrained generation and prints the workers' progress.
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[g0] training on Ray Train: 2 worker(s), CPU" in out
    assert [line.split()[2] for line in out.splitlines() if " step " in line] == ["50/200", "100/200", "150/200",
                                                                                 "200/200"]
    assert "loss" in out and "val_acc" in out and "trained g0: test accuracy" in out
    m0 = read_metrics(cfg, "g0")
    r0 = TrainResult("g0", str(tmp_path / "run" / "generations" / "g0" / "model.pt"), m0["sha256"], m0)
    r1 = train_generation(cfg, "g1")
    m1 = read_metrics(cfg, "g1")
    assert m1["parent"] == "g0" and m1["sha256"] == r1.sha256
    assert m1["constraints"] == [
        {"kind": "bct", "name": "g0", "sha256": r0.sha256, "importance": 1.0, "weight": 3.0},
        {"kind": "focal_distillation", "name": "g0", "sha256": r0.sha256, "weight": 0.5}]
    assert m1["scaling"]["num_workers"] == 2 and m1["test_accuracy"] > 0.85
    assert [h["step"] for h in m1["history"]] == [150, 300, 450, 600]
    # BCT: g1's queries searched against g0's gallery beat g0 against itself.
    ds = load_dataset(cfg.data)
    g0, _ = load_model(r0.checkpoint, r0.sha256)
    g1, _ = load_model(r1.checkpoint, r1.sha256)
    q1, q0, gal0 = predict(g1, ds.query.x)[0], predict(g0, ds.query.x)[0], predict(g0, ds.gallery.x)[0]
    m_old_old = retrieval_top1(q0, ds.query.y, gal0, ds.gallery.y)
    m_new_old = retrieval_top1(q1, ds.query.y, gal0, ds.gallery.y)
    assert m_new_old > m_old_old, (m_new_old, m_old_old)


def test_killed_worker_resumes_from_checkpoint_and_finishes(ray_session, tmp_path):
    cfg = _cfg(tmp_path, steps=300)
    marker = tmp_path / "killed-once"
    job = with_fault(build_job(cfg, "g0"), at_step=220, marker=str(marker))
    result = run_training(job)
    assert marker.exists(), "the worker was not killed"
    m = result.metrics
    assert m["history"][-1]["step"] == 300
    assert m["resumed_from_step"] is not None and m["resumed_from_step"] >= 50, m["history"]
    assert m["test_accuracy"] > 0.85


def test_interrupted_run_continues_when_rerun(ray_session, tmp_path):
    cfg = _cfg(tmp_path, max_failures=0)
    marker = tmp_path / "killed-once"
    job = with_fault(build_job(cfg, "g0"), at_step=160, marker=str(marker))
    with pytest.raises(Exception):
        run_training(job)  # no restarts allowed: the run fails
    assert read_metrics(cfg, "g0") is None
    result = run_training(job)  # the same job again: the marker keeps the worker alive now
    assert result.metrics["resumed_from_step"] is not None and result.metrics["resumed_from_step"] >= 50
    assert result.metrics["history"][-1]["step"] == 200
    saved = json.loads((tmp_path / "run" / "generations" / "g0" / "metrics.json").read_text())
    assert saved["sha256"] == result.sha256
    # Reproducible: the same config and seed trained again from scratch, uninterrupted, in
    # another run directory, gives the very same weights (the resumed run included).
    fresh = run_training(build_job(_cfg(tmp_path / "again", max_failures=0), "g0"))
    resumed, _ = load_model(result.checkpoint, result.sha256)
    again, _ = load_model(fresh.checkpoint, fresh.sha256)
    assert resumed.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in resumed.state_dict().items())


def test_lqf_recipe_trains_on_two_workers_and_loads_through_the_serving_loader(ray_session, tmp_path):
    from workers.checkpoint import load_model
    from workers.lqf import LinearizedNet

    cfg = parse_config({
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "digits", "test_fraction": 0.4},
        "generations": [
            {"name": "g0", "train_fraction": 0.3,
             "arch": {"type": "mlp", "width": 32, "depth": 2, "embed_dim": 32, "activation": "leaky_relu"},
             "train": {"steps": 200, "batch_size": 64, "eval_every": 100}},
            {"name": "g1", "recipe": "lqf",
             "arch": {"type": "mlp", "width": 32, "depth": 2, "embed_dim": 32, "activation": "leaky_relu"},
             "train": {"steps": 200, "batch_size": 64, "eval_every": 100, "lr": 0.1},
             "lqf": {"target_scale": 20.0, "damping": 0.01}},
        ],
        "scaling": {"num_workers": 2},
    })
    r0 = train_generation(cfg, "g0")
    r1 = train_generation(cfg, "g1")
    model, meta = load_model(r1.checkpoint, r1.sha256)  # the one loader serving uses too
    assert isinstance(model, LinearizedNet) and meta["recipe"] == "lqf"
    # Fine-tuning on 3x the data from g0's weights must not be worse than g0.
    assert r1.metrics["test_accuracy"] >= r0.metrics["test_accuracy"] - 0.01


def test_heterogeneous_pair_with_ensemble_references_on_ray(ray_session, tmp_path):
    """A small MLP query model trained against a CNN gallery model's frozen head, distilled
    from 2 same-architecture references trained as Ray tasks; a rerun reuses their cached
    logits instead of training them again."""
    cfg = parse_config({
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "digits", "test_fraction": 0.4},
        "generations": [
            {"name": "cloud", "arch": {"type": "cnn1d", "width": 16, "depth": 2, "embed_dim": 32},
             "train": {"steps": 300, "batch_size": 64, "eval_every": 150}},
            {"name": "edge", "arch": {"type": "mlp", "width": 32, "depth": 1, "embed_dim": 32},
             "train": {"steps": 300, "batch_size": 64, "eval_every": 150, "seed": 1},
             "compat": {"bct": {"weight": 2.0}, "ensemble": {"members": 2, "weight": 0.2}}},
        ],
        "scaling": {"num_workers": 2},
    })
    r0 = train_generation(cfg, "cloud")
    lines: list[str] = []
    r1 = train_generation(cfg, "edge", log=lines.append)
    assert any("training 2 ensemble references in parallel on Ray" in s for s in lines)
    assert {"kind": "ensemble", "members": 2, "weight": 0.2} in r1.metrics["constraints"]
    ds = load_dataset(cfg.data)
    cloud, _ = load_model(r0.checkpoint, r0.sha256)
    edge, _ = load_model(r1.checkpoint, r1.sha256)
    assert edge.spec.type == "mlp" and cloud.spec.type == "cnn1d"
    gallery = predict(cloud, ds.gallery.x)[0]
    m_cloud = retrieval_top1(predict(cloud, ds.query.x)[0], ds.query.y, gallery, ds.gallery.y)
    m_edge = retrieval_top1(predict(edge, ds.query.x)[0], ds.query.y, gallery, ds.gallery.y)
    # Edge queries in the cloud model's gallery: far above chance (10 %), near the cloud's own.
    assert m_edge > 0.8 * m_cloud and m_edge > 0.6, (m_edge, m_cloud)
    # Preparing the same generation again (a rerun) reads the references' logits back.
    lines.clear()
    gen = cfg.generation("edge")
    split = generation_train_split(ds, gen.train_fraction, gen.label_noise, gen.train.seed)
    again = build_targets(build_job(cfg, "edge"), split, log=lines.append)
    assert any("ensemble logits from cache" in s for s in lines)
    assert again.ensemble_logits.shape == (len(split), ds.num_classes)


def test_weight_interpolation_fine_tunes_the_parent_and_moves_back_toward_it(ray_session, tmp_path):
    raw = _raw(tmp_path, steps=100)
    g0, g1 = raw["generations"]
    g1.update(arch=dict(g0["arch"]), compat={"weight_interpolation": {"alpha": "auto", "max_error_increase": 0.01}},
              train={"steps": 200, "batch_size": 64, "eval_every": 100, "seed": 1, "lr": 1e-3})
    cfg = parse_config(raw)
    r0 = train_generation(cfg, "g0")
    job = build_job(cfg, "g1")
    r1 = run_training(job)
    wi = r1.metrics["weight_interpolation"]
    errors = {float(a): e for a, e in wi["val_error_by_alpha"].items()}
    assert wi["alpha"] == choose_alpha(errors, 0.01)
    assert {"kind": "weight_interpolation", "name": "g0", "sha256": r0.sha256, "alpha": "auto"} in \
        r1.metrics["constraints"]
    # The saved weights are alpha * g0 + (1 - alpha) * the fine-tuned weights of the last
    # Ray Train checkpoint (which started from g0's weights, not from a fresh init).
    states = sorted((tmp_path / "run").rglob(f"checkpoint_*/{STATE_FILE}"), key=lambda p: p.parent.name)
    tuned = torch.load(states[-1], map_location="cpu", weights_only=True)
    assert tuned["step"] == 200
    parent, _ = load_model(r0.checkpoint, r0.sha256)
    saved, _ = load_model(r1.checkpoint, r1.sha256)
    expect = interpolate_state(parent.state_dict(), tuned["model"], wi["alpha"])
    assert all(torch.allclose(v, expect[k], atol=1e-6) for k, v in saved.state_dict().items())
    # fine-tuned from the parent: after 200 small steps it is still far nearer g0 than the
    # network g1's seed would have started from
    from workers.models import build_model

    torch.manual_seed(1)
    init = build_model(cfg.generation("g1").arch, (64,), 10).state_dict()
    dist = lambda a, b: sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a)  # noqa: E731
    assert dist(tuned["model"], parent.state_dict()) < 0.5 * dist(init, parent.state_dict())
