"""Serving an LQF generation (a `LinearizedNet`, served through a JVP) without Ray: in the
router (`LocalGeneration`) and in a generation's Serve replica (`ModelServer`, constructed
as a plain object). Both load through `workers.checkpoint.load_model`."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from serving.local import LocalGeneration
from serving.refs import ModelRef
from workers.checkpoint import CheckpointError, load_model, save_model
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
    assert local.describe() == {"name": "g1", "sha256": sha, "input_dim": 16, "num_classes": 3}


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
    assert server.info() == {"name": "g1", "sha256": sha, "input_dim": 16, "num_classes": 3}
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
