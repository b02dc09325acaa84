"""Per-generation training data on real Ray Train: g0 knows 5 classes (the run's data),
g1 trains on its own data with 10 classes against g0 (BCT masks the classes g0 does not
know, Focal Distillation uses the shared ones), and both are evaluated on the run's
common test split. Models and data come from factories by import path."""

from __future__ import annotations

import numpy as np
import yaml

from orchestrator.chain import train_generation
from orchestrator.config import load_config
from orchestrator.evaluation.evaluate import evaluate
from orchestrator.registry import Registry, registry_path
from orchestrator.rundir import read_metrics
from workers.data import load_dataset
from workers.training import predict

ARCH = {"type": "cnn2d", "width": 8, "depth": 1, "embed_dim": 16}
TRAIN = {"steps": 60, "batch_size": 64, "eval_every": 60}


def test_a_generation_with_new_data_and_new_classes_trains_against_the_old_one(ray_session, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "custom", "factory": "tests.factories:first_classes", "kwargs": {"classes": 5}},
        "generations": [
            {"name": "g0", "arch": ARCH, "train": TRAIN},
            {"name": "g1", "arch": ARCH, "train": {**TRAIN, "seed": 1},
             "train_data": {"source": "custom", "factory": "tests.factories:digits_images"},
             "compat": {"bct": {"weight": 1.0}, "focal_distillation": {"weight": 1.0}}},
        ],
        "scaling": {"num_workers": 2},
        "gates": {"max_error_increase": 1.0, "max_nfr": 1.0, "max_class_nfr": 1.0, "require_bct": False},
    }, sort_keys=False))
    cfg = load_config(path)
    quiet = lambda s: None  # noqa: E731
    train_generation(cfg, "g0", log=quiet)
    train_generation(cfg, "g1", log=quiet)

    m0, m1 = read_metrics(cfg, "g0"), read_metrics(cfg, "g1")
    assert (m0["num_classes"], m1["num_classes"]) == (5, 10)
    assert m1["parent"] == "g0" and m1["input_shape"] == [1, 8, 8]
    assert m1["train_samples"] > m0["train_samples"]  # all 1797 digits against the 5-class pool's share
    assert {c["kind"] for c in m1["constraints"]} == {"bct", "focal_distillation"}
    assert m1["data_fingerprint"] != m0["data_fingerprint"]

    ds = load_dataset(cfg.data)
    assert set(np.unique(ds.test.y)) <= set(range(5))  # the common test split: the run's 5 classes
    with Registry(registry_path(cfg)) as reg:
        from orchestrator.evaluation.evaluate import load_verified

        logits = predict(load_verified(reg, "g1", cfg), ds.test.x)[1]
        assert logits.shape == (len(ds.test), 10)
        ev = evaluate(cfg, "g1", registry=reg, n_boot=50)
    assert ev.baseline == "g0" and 0.0 <= ev.metrics["nfr"] <= 1.0
    assert len(ev.per_class_nfr) == 10  # the candidate's classes, the new ones included
