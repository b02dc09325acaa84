"""Architectures expose embedding and head separately; checkpoints round-trip and refuse tampering."""

from __future__ import annotations

import pytest
import torch

from workers.checkpoint import CheckpointError, load_model, save_model, sha256_file
from workers.models import build_model
from workers.specs import ArchSpec


@pytest.mark.parametrize("kind", ["mlp", "cnn1d"])
@pytest.mark.parametrize("head", ["cosine", "linear"])
def test_embed_and_head(kind, head):
    model = build_model(ArchSpec(type=kind, width=8, depth=2, embed_dim=12, head=head), 40, 10)
    x = torch.randn(5, 40)
    z = model.embed(x)
    assert z.shape == (5, 12)
    logits = model.head(z)
    assert logits.shape == (5, 10)
    assert torch.allclose(model(x), logits)
    if head == "cosine":
        assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)
        assert logits.abs().max() <= 16.0 + 1e-4  # |scale * cos| <= scale


def test_every_parameter_takes_part_in_the_loss():
    """DDP fails on unused parameters: each one must get a gradient."""
    for kind in ("mlp", "cnn1d"):
        model = build_model(ArchSpec(type=kind, width=8, depth=2), 40, 10)
        model(torch.randn(4, 40)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_leaky_relu_option():
    model = build_model(ArchSpec(type="mlp", activation="leaky_relu", negative_slope=0.2), 10, 3)
    assert any(isinstance(mod, torch.nn.LeakyReLU) and mod.negative_slope == 0.2 for mod in model.modules())


def test_bad_dimensions():
    with pytest.raises(ValueError, match="num_classes > 1"):
        build_model(ArchSpec(), 40, 1)


def test_checkpoint_round_trip(tmp_path):
    model = build_model(ArchSpec(type="cnn1d", width=8), 40, 10)
    sha = save_model(model, tmp_path / "ck", meta={"generation": "g0"})
    assert sha == sha256_file(tmp_path / "ck" / "model.pt")
    loaded, meta = load_model(tmp_path / "ck", sha256=sha)
    x = torch.randn(3, 40)
    assert torch.allclose(loaded(x), model.eval()(x))
    assert meta == {"generation": "g0"}


def test_tampered_and_truncated_checkpoints_are_refused(tmp_path):
    model = build_model(ArchSpec(type="mlp", width=8), 40, 10)
    sha = save_model(model, tmp_path / "ck")
    f = tmp_path / "ck" / "model.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="changed or truncated"):
        load_model(tmp_path / "ck", sha256=sha)
    f.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(CheckpointError, match="changed or truncated"):
        load_model(tmp_path / "ck", sha256=sha)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(tmp_path / "ck")  # no checksum given: still a clear error, not a crash


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nothing")


def test_pickled_objects_are_not_executed(tmp_path):
    """weights_only=True: a checkpoint carrying an arbitrary object is refused."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": 1, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(tmp_path / "evil.pt")
