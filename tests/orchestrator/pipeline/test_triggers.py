"""Generations from snapshot files and from a schedule: stable names, stable order,
recorded once with the file's sha256, nothing recorded by a read-only caller."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from orchestrator.config import parse_config
from orchestrator.pipeline.triggers import effective_config, generation_name, snapshot_files
from orchestrator.registry import Registry, registry_path

TEMPLATE = {"arch": {"type": "mlp", "width": 8, "depth": 1, "embed_dim": 8}, "train": {"steps": 5}}


def _cfg(tmp_path, **pipeline):
    raw = {"run_dir": str(tmp_path / "run"), "data": {"source": "digits"}, "generations": [{"name": "g0"}],
           "pipeline": {"template": TEMPLATE, **pipeline}}
    return parse_config(raw, "c.yaml", base_dir=tmp_path)


def _snap(tmp_path, name, mtime):
    p = tmp_path / "snaps" / name
    p.parent.mkdir(exist_ok=True)
    np.savez(p, x=np.zeros((4, 64), np.float32), y=np.arange(4))
    os.utime(p, (mtime, mtime))
    return p


def test_each_settled_snapshot_is_a_generation_in_file_age_order_recorded_once(tmp_path):
    cfg = _cfg(tmp_path, snapshots={"pattern": "snaps/*.npz", "name": "snap-{stem}", "settle_seconds": 60})
    old = _snap(tmp_path, "b.npz", 1_000_000)
    _snap(tmp_path, "a.npz", 1_000_100)
    _snap(tmp_path, "fresh.npz", 4_000_000_000)  # still being written (mtime in the future): not taken
    assert snapshot_files(cfg) == [old.resolve(), (tmp_path / "snaps" / "a.npz").resolve()]
    with Registry(registry_path(cfg)) as reg:
        assert [g.name for g in effective_config(cfg, reg).generations] == ["g0", "snap-b", "snap-a"]
        assert not reg.events("pipeline")  # read-only: nothing recorded
        eff = effective_config(cfg, reg, record=True)
        again = effective_config(cfg, reg, record=True)
        assert [g.name for g in again.generations] == [g.name for g in eff.generations]
        snaps = [e.data for e in reg.events("pipeline") if e.action == "pipeline_snapshot"]
    assert [s["generation"] for s in snaps] == ["snap-b", "snap-a"]  # once each
    assert snaps[0]["sha256"] == hashlib.sha256(old.read_bytes()).hexdigest()
    gen = eff.generation("snap-b")
    assert gen.train_data.source == "npz" and gen.train_data.path == old.resolve() and gen.train.steps == 5


def test_a_custom_data_spec_gets_the_snapshot_path(tmp_path):
    data = {"source": "custom", "factory": "tests.factories:catalogue_items", "kwargs": {"path": "{snapshot}"}}
    cfg = _cfg(tmp_path, snapshots={"pattern": "snaps/*.npz", "data": data, "settle_seconds": 0})
    p = _snap(tmp_path, "x.npz", 1_000_000)
    gen = effective_config(cfg).generation("x")
    assert gen.train_data.factory == "tests.factories:catalogue_items"
    assert gen.train_data.kwargs == {"path": str(p.resolve())}


def test_the_schedule_counts_slots_from_its_recorded_start(tmp_path):
    cfg = _cfg(tmp_path, schedule_seconds=3600)
    with Registry(registry_path(cfg)) as reg:
        assert [g.name for g in effective_config(cfg, reg).generations] == ["g0"]  # no start recorded yet
        first = [g.name for g in effective_config(cfg, reg, record=True).generations]
        assert len(first) == 2 and first[1].startswith("sched-") and first[1].endswith("Z")
        assert [g.name for g in effective_config(cfg, reg).generations] == first


@pytest.mark.parametrize("template,stem,want", [("{stem}", "a b", "a-b"), ("x-{stem}", "#", "x"),
                                                 ("{stem}", "_hidden", "s_hidden")])
def test_names_are_valid_and_stable(template, stem, want):
    assert generation_name(template, stem) == want
