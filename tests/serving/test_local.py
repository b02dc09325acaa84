"""Serving an LQF generation (a `LinearizedNet`, served through a JVP) without Ray: in the
router (`LocalGeneration`) and in a generation's Serve replica (`ModelServer`, constructed
as a plain object). Both load through `workers.checkpoint.load_model`."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from serving.local import LocalGeneration, serving_device
from serving.refs import ModelRef
from workers.checkpoint import BUILTIN, CheckpointError, load_model, save_model
from workers.lqf import LinearizedNet, fold, save_lqf
from workers.models import build_model
from workers.specs import ArchSpec
from tests.helpers import moved_lqf


def _lqf(head: str = "cosine") -> LinearizedNet:
    torch.manual_seed(0)
    parent = build_model(ArchSpec(type="cnn1d", width=6, depth=2, embed_dim=5, head=head), 16, 3)
    return moved_lqf(parent)


def _x(rows: int = 7) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((rows, 16)).astype(np.float32)


@pytest.mark.parametrize("head", ["cosine", "linear"])
def test_an_lqf_generation_served_in_the_router_predicts_what_the_model_does(tmp_path, head):
    lin = _lqf(head)
    sha = save_lqf(lin, tmp_path / "g1")
    local = LocalGeneration(ModelRef("g1", str(tmp_path / "g1"), sha))
    assert isinstance(local.model, LinearizedNet)
    x = _x()

    async def call():
        return await local.predict.remote(x), await local.embed.remote(x)

    probs, emb = asyncio.run(call())
    with torch.no_grad():
        want = torch.softmax(lin(torch.from_numpy(x)), dim=-1).numpy()
        want_emb = lin.embed(torch.from_numpy(x)).numpy()
        folded = torch.softmax(fold(lin)(torch.from_numpy(x)), dim=-1).numpy()
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb, want_emb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    # It really serves the linearisation (the JVP survives inference mode), not the folded net.
    assert np.abs(probs - folded).max() > 1e-4
    assert local.describe() == {"name": "g1", "sha256": sha, "input_shape": [16], "input_dim": 16, "num_classes": 3}


def test_a_changed_lqf_checkpoint_is_not_served(tmp_path):
    sha = save_lqf(_lqf(), tmp_path / "g1")
    save_lqf(_lqf("linear"), tmp_path / "g1")  # replaced after the sha256 was recorded
    with pytest.raises(CheckpointError, match="changed or truncated"):
        LocalGeneration(ModelRef("g1", str(tmp_path / "g1"), sha))


def test_the_serve_replica_loads_and_describes_an_lqf_generation(tmp_path):
    from serving.deploy import ModelServer
    from serving.local import probabilities

    lin = _lqf()
    sha = save_lqf(lin, tmp_path / "g1")
    server = ModelServer(ModelRef("g1", str(tmp_path / "g1"), sha), max_batch_size=8, batch_wait_timeout_s=0.001)
    assert isinstance(server.model, LinearizedNet) and server.meta["recipe"] == "lqf"
    assert server.info() == {"name": "g1", "sha256": sha, "input_shape": [16], "input_dim": 16, "num_classes": 3}
    x = _x(5)
    parts = server._run([x[:2], x[2:]], probabilities(server.model))  # what a batched predict runs
    with torch.no_grad():
        want = torch.softmax(lin(torch.from_numpy(x)), dim=-1).numpy()
    np.testing.assert_allclose(np.concatenate(parts), want, rtol=1e-5, atol=1e-6)


def test_plain_generations_are_served_as_before(tmp_path):
    torch.manual_seed(1)
    net = build_model(ArchSpec(type="mlp", width=8, depth=1, embed_dim=4), 16, 3).eval()
    sha = save_model(net, tmp_path / "g0")
    local = LocalGeneration(ModelRef("g0", str(tmp_path / "g0"), sha))
    x = _x()
    probs = asyncio.run(_await(local.predict.remote, x))
    with torch.no_grad():
        np.testing.assert_allclose(probs, torch.softmax(net(torch.from_numpy(x)), -1).numpy(), rtol=1e-5, atol=1e-6)
    assert type(load_model(tmp_path / "g0", sha)[0]) is type(net)


async def _await(fn, x):
    return await fn(x)


def test_image_generations_warm_up_and_serve_rows_of_their_shape(tmp_path):
    """A cnn2d on (1, 8, 8): warmed up on a zero image, it answers (N, 1, 8, 8) rows, in
    the router and in a Serve replica, and both describe its input shape."""
    from serving.deploy import ModelServer
    from serving.local import probabilities

    torch.manual_seed(2)
    net = build_model(ArchSpec(type="cnn2d", width=4, depth=1, embed_dim=8), (1, 8, 8), 3).eval()
    sha = save_model(net, tmp_path / "img")
    ref = ModelRef("img", str(tmp_path / "img"), sha, BUILTIN)
    local = LocalGeneration(ref)
    server = ModelServer(ref, max_batch_size=8, batch_wait_timeout_s=0.001)
    x = np.random.default_rng(3).standard_normal((5, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy(x)), -1).numpy()
    np.testing.assert_allclose(asyncio.run(_await(local.predict.remote, x)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(server._run([x[:2], x[2:]], probabilities(server.model))), want,
                               rtol=1e-5, atol=1e-6)
    assert local.describe() == server.info() == {"name": "img", "sha256": sha, "input_shape": [1, 8, 8],
                                                 "input_dim": 64, "num_classes": 3}


def test_a_ref_naming_another_factory_is_never_served(tmp_path):
    """The ref says what the config expects; a checkpoint built by another factory is
    refused in the router and in the replica, before anything is imported."""
    from serving.deploy import ModelServer

    net = build_model(ArchSpec(type="mlp", width=8, depth=1, embed_dim=4), 16, 3)
    sha = save_model(net, tmp_path / "g0")
    ref = ModelRef("g0", str(tmp_path / "g0"), sha, "mypkg.models:build")
    with pytest.raises(CheckpointError, match="factory"):
        LocalGeneration(ref)
    with pytest.raises(CheckpointError, match="factory"):
        ModelServer(ref, max_batch_size=8, batch_wait_timeout_s=0.001)
    assert LocalGeneration(ModelRef("g0", str(tmp_path / "g0"), sha, BUILTIN)).model.input_shape == (16,)


def test_generation_refs_carry_the_configs_factory_to_every_loader(tmp_path, cache_dir):
    """`orchestrator.apps.generation_ref` names the factory the config expects: a custom
    generation loads with it; after the config's factory changes, the same checkpoint is
    refused by the router's loader and by the catalogue builder."""
    import shutil

    import yaml

    from orchestrator.apps import build_catalogue, generation_ref
    from serving.catalogue import read_manifest
    from orchestrator.config import load_config
    from orchestrator.registry import Registry, registry_path
    from tests.helpers import write_untrained_run

    arch = {"type": "custom", "factory": "tests.factories:own_heads", "kwargs": {"dim": 8}, "embed_dim": 8}
    path = write_untrained_run(tmp_path, {"source": "digits", "test_fraction": 0.3, "val_fraction": 0.1},
                               arch, ("g0",))
    cfg = load_config(path)
    with Registry(registry_path(cfg)) as reg:
        ref = generation_ref(cfg, reg, "g0")
        assert ref.factory == "tests.factories:own_heads"
        assert LocalGeneration(ref).model.input_shape == (64,)
        assert read_manifest(build_catalogue(cfg, reg))["dim"] == 8
    raw = yaml.safe_load(path.read_text())
    raw["generations"][0]["arch"]["factory"] = "tests.factories:backbone"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    with Registry(registry_path(cfg)) as reg:
        ref = generation_ref(cfg, reg, "g0")
        assert ref.factory == "tests.factories:backbone"
        with pytest.raises(CheckpointError, match="tests.factories:own_heads"):
            LocalGeneration(ref)
        shutil.rmtree(cfg.catalogue_dir)  # built once: only a rebuild loads g0 again
        with pytest.raises(CheckpointError, match="factory"):
            build_catalogue(cfg, reg)


def test_a_replica_without_gpus_serves_on_the_cpu():
    assert serving_device(0).type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_gpu_replica_that_sees_no_cuda_device_says_so_at_start():
    with pytest.raises(RuntimeError, match=r"serving.gpus_per_replica is 1 but this replica sees no CUDA device"):
        serving_device(1)
