"""The catalogue end to end: `graceful catalogue build` embeds the items with Ray Data
actors in its own local Ray, `add` appends items embedded by the registry's production
(never touching stored vectors), `transform` maps the old vectors into production's
space, `backfill` re-embeds a share from the items' inputs, and bad or tampered input is
refused with the documented exit codes, nothing changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import yaml

from orchestrator.apps import generation_ref
from orchestrator.config import load_config
from orchestrator.registry import Registry, registry_path
from serving.catalogue import load_catalogue, read_manifest
from tests.integration.test_cli_serve import ROOT, _write_run
from workers.checkpoint import load_model
from workers.data import load_dataset
from workers.training import predict


def _graceful(*args: str) -> tuple[int, dict | str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    try:
        out = json.loads(p.stdout)
    except ValueError:
        out = p.stdout
    return p.returncode, out, p.stderr


def _vectors(cat) -> np.ndarray:
    return np.stack([cat.index.reconstruct(i) for i in range(len(cat))])


def test_build_with_ray_data_then_add_by_production_without_touching_stored_vectors(tmp_path):
    cfg_path = _write_run(tmp_path)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["retrieval"] = {"embed_workers": 2, "embed_batch_size": 64}
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    ds = load_dataset(cfg.data)
    rc, m, err = _graceful("catalogue", "build", str(cfg_path), "--json")
    assert rc == 0, err
    n = len(ds.gallery)
    assert (m["version"], m["count"], m["counts"], m["index"]["type"]) == (1, n, {"g0": n}, "flat")
    # The Ray Data actors' vectors are g0's own embeddings of the items, in the items' order.
    g0 = load_model(cfg.run_dir / "generations" / "g0" / "model.pt")[0]
    cat = load_catalogue(cfg.catalogue_dir)
    assert cat.ids.tolist() == [str(i) for i in range(n)]
    want = predict(g0, ds.gallery.x)[0]
    assert np.allclose(_vectors(cat), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    before = _vectors(cat)

    with Registry(registry_path(cfg)) as reg:  # g1 becomes production: it embeds what is added now
        generation_ref(cfg, reg, "g1")  # registered from the run dir
        reg.set_status("g1", "production", "test", "promoted for the catalogue test")
    new = np.random.default_rng(5).random((7, 64)).astype(np.float32)
    items = tmp_path / "new.npz"
    np.savez(items, ids=np.array([f"new-{i}" for i in range(7)]), x=new, y=np.arange(7) % 10)
    rc, m, err = _graceful("catalogue", "add", str(cfg_path), str(items), "--json", "--actor", "ops")
    assert rc == 0, err
    assert (m["version"], m["count"], m["counts"]) == (2, n + 7, {"g0": n, "g1": 7})
    cat = load_catalogue(cfg.catalogue_dir)
    assert np.array_equal(_vectors(cat)[:n], before)  # stored vectors untouched
    g1 = load_model(cfg.run_dir / "generations" / "g1" / "model.pt")[0]
    z1 = predict(g1, new)[0]
    assert np.allclose(_vectors(cat)[n:], z1 / np.linalg.norm(z1, axis=1, keepdims=True), atol=1e-5)
    assert cat.search(z1, 1)[1] == [[f"new-{i}"] for i in range(7)]
    with Registry(registry_path(cfg)) as reg:
        actions = [(e.action, e.subject, e.actor) for e in reg.events() if e.action.startswith("catalogue")]
    assert actions == [("catalogue_built", "g0", "catalogue"), ("catalogue_items_added", "g1", "ops")]
    g1_vectors = _vectors(cat)[n:]

    # Transform: g0's stored vectors mapped into production g1's space (no item read);
    # g1's own added items untouched.
    raw["retrieval"]["transform"] = {"steps": 50, "hidden": 16, "max_pairs": 400}
    cfg_path.write_text(yaml.safe_dump(raw))
    rc, m, err = _graceful("catalogue", "transform", str(cfg_path), "--json")
    assert rc == 0, err
    assert (m["version"], m["counts"]) == (3, {"g1": n + 7})
    fit = m["history"][-1]
    assert fit["op"] == "transformed" and fit["fits"][0]["from"] == "g0" and fit["fits"][0]["items"] == n
    assert fit["pairs"] == 400 and fit["seconds_per_million"] > 0
    cat = load_catalogue(cfg.catalogue_dir)
    assert np.allclose(_vectors(cat)[n:], g1_vectors, atol=1e-6)
    assert not np.allclose(_vectors(cat)[:n], before, atol=1e-3)
    rc, _, err = _graceful("catalogue", "transform", str(cfg_path))
    assert rc == 2 and "in g1's space already" in err
    # Backfill a third of the items, at random: g1 re-embeds them from their inputs.
    rc, m, err = _graceful("catalogue", "backfill", str(cfg_path), "--share", "0.33", "--order", "random", "--json")
    assert rc == 0, err
    cat = load_catalogue(cfg.catalogue_dir)
    redone = np.flatnonzero(cat.how == 2)
    assert m["version"] == 4 and len(redone) == round(0.33 * (n + 7)) and redone.max() < n
    z = predict(g1, ds.gallery.x[redone])[0]
    assert np.allclose(_vectors(cat)[redone], z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-5)

    # The same ids again: exit 2 naming them, nothing stored changes.
    rc, _, err = _graceful("catalogue", "add", str(cfg_path), str(items))
    assert rc == 2 and "already in the catalogue" in err and "new-0" in err
    assert read_manifest(cfg.catalogue_dir)["version"] == 4
    # A tampered index file: exit 1 naming it.
    f = cfg.catalogue_dir / read_manifest(cfg.catalogue_dir)["index_file"]
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    np.savez(items, ids=np.array(["other"]), x=new[:1])
    rc, _, err = _graceful("catalogue", "add", str(cfg_path), str(items))
    assert rc == 1 and "changed since the manifest recorded it" in err and f.name in err
    rc, _, err = _graceful("catalogue", "add", str(cfg_path), str(tmp_path / "missing.npz"))
    assert rc == 2 and "no such file" in err
