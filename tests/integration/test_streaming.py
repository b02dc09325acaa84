"""Streaming data on real Ray Train and Ray Data: a `data.source: ray` factory's rows stream
to 2 DDP workers (`get_dataset_shard`), one of which is killed mid-run (the restarted group
reads a fresh stream and finishes); a second generation is distilled (Focal Distillation)
from the production model whose logits a Ray Data actor adds to the stream; metrics.json,
the checkpoint, and the in-memory eval splits are checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.chain import build_job, train_generation
from orchestrator.config import parse_config
from workers.checkpoint import load_model
from workers.data import load_dataset
from workers.train import with_fault
from workers.training import accuracy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray4():
    """A local Ray with 4 logical CPUs on this 2-core machine: 2 training workers of 1 CPU,
    and room beside them for Ray Data's read tasks and the old model's actor."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


GEN = {"arch": {"type": "mlp", "width": 32, "depth": 2, "embed_dim": 16},
       "train": {"steps": 60, "batch_size": 64, "eval_every": 20}}


def _cfg(tmp_path, generations=None):
    return parse_config({
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "ray", "factory": "tests.fixtures_streaming:blobs", "kwargs": {"n": 3000},
                 "num_classes": 4, "eval_rows": 200},
        "generations": generations or [
            {"name": "g0", "train_fraction": 0.5, **GEN},
            {"name": "g1", **GEN, "train": {**GEN["train"], "seed": 1},
             "compat": {"focal_distillation": {"form": "kl", "beta": 1.0, "weight": 1.0}, "bct": {"weight": 1.0}}},
        ],
        "scaling": {"num_workers": 2, "max_failures": 1},
    })


def test_a_streamed_chain_trains_with_focal_distillation_from_production(ray4, tmp_path):
    cfg = _cfg(tmp_path)
    ds = load_dataset(cfg.data)
    # Val and test in memory, capped at eval_rows; no training rows; the same rows each time.
    assert len(ds.test) == 200 and len(ds.val) == 200 and len(ds.train) == 0
    assert ds.input_shape == (16,) and ds.num_classes == 4
    again = load_dataset(cfg.data)
    assert np.array_equal(again.test.x, ds.test.x) and np.array_equal(again.val.y, ds.val.y)

    lines: list[str] = []
    marker = tmp_path / "killed-once"
    r0 = train_generation(cfg, "g0", log=lines.append,
                          job=with_fault(build_job(cfg, "g0"), at_step=50, marker=str(marker)))
    assert any("training on Ray Train: 2 worker(s), CPU, a stream (Ray Data), 60 steps" in s for s in lines), lines
    # A worker was killed at step 50: the restarted group read the stream afresh and finished
    # (from the last checkpoint Ray Train had recorded by then, if any).
    assert marker.exists() and r0.metrics["history"][-1]["step"] == 60
    assert r0.metrics["resumed_from_step"] in (None, 20, 40)
    r1 = train_generation(cfg, "g1", log=lines.append)  # g0 is production now: FD distils it
    m1 = json.loads((tmp_path / "run" / "generations" / "g1" / "metrics.json").read_text())
    assert m1["sha256"] == r1.sha256 and m1["parent"] == "g0" and m1["streamed"] is True
    assert {"kind": "focal_distillation", "name": "g0", "sha256": r0.sha256, "weight": 1.0} in m1["constraints"]
    assert m1["train_samples"] == 60 * 64  # rows the steps consumed
    assert m1["data_fingerprint"].startswith("spec-") and m1["data_fingerprint"] != r0.metrics["data_fingerprint"]
    assert [h["step"] for h in m1["history"]] == [20, 40, 60]
    assert m1["input_shape"] == [16] and m1["num_classes"] == 4
    assert len(m1["worker_peak_rss_mb"]) == 2 and all(v > 0 for v in m1["worker_peak_rss_mb"])
    # The checkpoint loads (sha256-verified) and has learnt the blobs.
    model, _ = load_model(r1.checkpoint, r1.sha256)
    assert accuracy(model, ds.test) == pytest.approx(m1["test_accuracy"]) and m1["test_accuracy"] > 0.8
    assert r0.metrics["test_accuracy"] > 0.8


def test_ensemble_distillation_on_a_stream_is_refused_naming_the_setting(tmp_path):
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match=r"generations\[0\]\.compat\.ensemble"):
        _cfg(tmp_path, [{"name": "g0", **GEN, "compat": {"ensemble": {"members": 2}}}])
