"""Architectures expose embedding and head separately; checkpoints round-trip and refuse tampering."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests import factories
from workers.checkpoint import CheckpointError, load_model, save_model, sha256_file
from workers.factory import FactoryError, load_callable
from workers.models import (
    CosineHead,
    GracefulNet,
    ResidualBlock,
    UserNet,
    build_model,
    leaky_relus,
)
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


# --- any input shape, cnn2d, custom factories ---------------------------------------------


def _custom(name: str, **kw) -> ArchSpec:
    return ArchSpec(type="custom", factory=f"tests.factories:{name}", **kw)


@pytest.mark.parametrize("shape", [(1, 8, 8), (8, 8), (3, 9, 7)])
def test_cnn2d_embeds_images_of_any_size_on_the_unit_sphere(shape):
    model = build_model(ArchSpec(type="cnn2d", width=4, depth=3, embed_dim=6), shape, 5)
    x = torch.randn(3, *shape)
    z, logits = model.embed_and_logits(x)
    assert z.shape == (3, 6) and logits.shape == (3, 5)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    assert model.input_shape == shape and model.input_dim == int(torch.tensor(shape).prod())
    assert sum(isinstance(m, ResidualBlock) for m in model.modules()) == 3


def test_cnn2d_every_parameter_takes_part_in_the_loss():
    model = build_model(ArchSpec(type="cnn2d", width=4, depth=2), (1, 8, 8), 3)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("kind,shape,match", [
    ("cnn1d", (1, 8, 8), r"cnn1d takes inputs of shape \(L,\) or \(C, L\), got \(1, 8, 8\)"),
    ("cnn2d", (64,), r"cnn2d takes images of shape \(H, W\) or \(C, H, W\), got \(64,\)"),
    ("cnn2d", (1, 1, 8, 8), r"cnn2d takes images .* got \(1, 1, 8, 8\)"),
])
def test_convolutions_refuse_inputs_of_the_wrong_rank(kind, shape, match):
    with pytest.raises(ValueError, match=match):
        build_model(ArchSpec(type=kind, width=4), shape, 3)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 9, 7), (2, 5)])
def test_mlp_flattens_rows_of_any_shape(shape):
    model = build_model(ArchSpec(type="mlp", width=8, depth=1, embed_dim=4), shape, 3)
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert first.in_features == int(torch.tensor(shape).prod())
    assert model(torch.randn(2, *shape)).shape == (2, 3)


def test_custom_backbone_gets_a_projection_and_a_cosine_head():
    """TinyBackbone(width 4) pools to 2x2: 4 * 2 * 2 = 16 features -> Linear(16, 6)."""
    model = build_model(_custom("backbone", embed_dim=6), (1, 8, 8), 5)
    assert type(model) is GracefulNet and isinstance(model.trunk, factories.TinyBackbone)
    assert (model.project.in_features, model.project.out_features) == (16, 6)
    assert isinstance(model.classifier, CosineHead) and model.classifier.weight.shape == (5, 6)
    z, logits = model.embed_and_logits(torch.randn(3, 1, 8, 8))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    assert logits.shape == (3, 5) and logits.abs().max() <= model.spec.scale + 1e-4
    linear = build_model(_custom("backbone", embed_dim=6, head="linear"), (1, 8, 8), 5)
    assert isinstance(linear.classifier, nn.Linear) and not linear.unit_embeddings


def test_custom_module_with_embed_and_head_is_used_as_it_is():
    torch.manual_seed(0)
    model = build_model(_custom("own_heads"), (1, 8, 8), 4)
    assert type(model) is UserNet and isinstance(model.net, factories.OwnHeads)
    assert model.embed_dim == 16 and not model.unit_embeddings
    x = torch.randn(5, 1, 8, 8)
    z = model.embed(x)
    assert torch.equal(z, model.net.body(x))  # not normalised, not projected
    assert not torch.allclose(z.norm(dim=1), torch.ones(5))
    assert torch.equal(model.head(z), model.net.cls(z))  # the user's head
    assert torch.equal(model(x), model.net.cls(model.net.body(x)))
    assert isinstance(model.classifier, nn.Module) and torch.equal(model.classifier(z), model.net.cls(z))
    # No parameter of graceful's own: the state is exactly the user's module's.
    assert set(model.state_dict()) == {f"net.{k}" for k in model.net.state_dict()}


def test_a_head_submodule_is_the_classifier():
    model = build_model(_custom("submodule_head"), (6,), 3)
    assert type(model) is UserNet and model.classifier is model.net.head and model.embed_dim == 5


def test_factory_kwargs_are_passed_through():
    assert build_model(_custom("own_heads", kwargs={"dim": 7}), (1, 8, 8), 4).embed_dim == 7
    wide = build_model(_custom("backbone", kwargs={"width": 5}), (1, 8, 8), 4)
    assert wide.trunk.body[0].out_channels == 5 and wide.project.in_features == 5 * 2 * 2


@pytest.mark.parametrize("name,match", [
    ("not_a_module", r"arch\.factory tests\.factories:not_a_module returned a str, not a torch\.nn\.Module"),
    ("failing", r"arch\.factory tests\.factories:failing\(.*\) failed: RuntimeError: no weights for you"),
    ("nope", r"arch\.factory 'tests\.factories:nope': module 'tests\.factories' has no attribute 'nope'"),
    ("wrong_head_classes", r"arch\.factory tests\.factories:wrong_head_classes: head\(z\) must return \(N, 3\)"),
])
def test_factory_problems_are_errors_naming_the_factory(name, match):
    with pytest.raises(ValueError, match=match):
        build_model(_custom(name), (2, 8), 3)


def test_a_factory_that_does_not_import_is_a_factory_error_naming_it():
    spec = ArchSpec(type="custom", factory="nonexistent_pkg_xyz.m:f")
    with pytest.raises(FactoryError, match=r"arch\.factory 'nonexistent_pkg_xyz\.m:f': cannot import "
                                           r"'nonexistent_pkg_xyz\.m' \(ModuleNotFoundError"):
        build_model(spec, (4,), 3)


def test_a_malformed_import_path_is_refused():
    with pytest.raises(ValueError, match="factory"):
        ArchSpec(type="custom", factory="tests/factories.py:backbone")
    for bad in ("no_colon", "a.b:", ":f", "a b:c", 3):
        with pytest.raises(FactoryError, match="expected 'package.module:callable'"):
            load_callable(bad, "arch.factory")
    with pytest.raises(FactoryError, match=r"'math:pi': 'pi' is a float, not a callable"):
        load_callable("math:pi", "arch.factory")
    assert load_callable("tests.factories:OwnHeads.embed") is factories.OwnHeads.embed  # dotted attribute


def test_a_backbone_with_the_wrong_output_rank_is_refused():
    """Conv1d on (C, L) returns (N, 3, L): not features (N, F)."""
    with pytest.raises(ValueError, match=r"must map \(N, \*input_shape\) to features \(N, F\), got \(2, 3, 8\)"):
        build_model(_custom("sequence_output"), (2, 8), 3)
    with pytest.raises(ValueError, match=r"fails on inputs of shape \(1, 8, 8\)"):
        build_model(_custom("wrong_input_channels"), (1, 8, 8), 3)


@pytest.mark.parametrize("name,shape", [("sequence_output", (2, 8)), ("wrong_input_channels", (1, 8, 8))])
def test_a_backbone_that_is_refused_is_named_in_the_error(name, shape):
    with pytest.raises(ValueError, match=f"tests.factories:{name}"):
        build_model(_custom(name), shape, 3)


def test_leaky_relus_replaces_every_relu_module_and_counts_them():
    """Two nn.ReLU (one nested); the existing LeakyReLU(0.3) and F.relu-free layers stay.
    At x = -2 a LeakyReLU(0.1) gives -0.2."""
    net = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Identity(), nn.ReLU(), nn.LeakyReLU(0.3)))
    assert leaky_relus(net, 0.1) == 2
    assert not any(type(m) is nn.ReLU for m in net.modules())
    slopes = sorted(m.negative_slope for m in net.modules() if isinstance(m, nn.LeakyReLU))
    assert slopes == [0.1, 0.1, 0.3]
    # -2 -> -0.2 -> -0.02 -> -0.006
    torch.testing.assert_close(net(torch.tensor([-2.0])), torch.tensor([-0.006]))
    assert leaky_relus(net, 0.1) == 0
    model = build_model(_custom("own_heads"), (4,), 3)
    assert leaky_relus(model, 0.2) == 1 and isinstance(model.net.body[2], nn.LeakyReLU)
