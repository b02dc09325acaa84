"""Checkpoint loading verifies the bytes it loads: the file is read once, hashed, and
`torch.load`ed from memory, so a retrain replacing model.pt between the check and the load
cannot slip unverified weights in. `load_model` is the one loader: it dispatches on the
checkpoint's kind (plain -> GracefulNet, lqf -> LinearizedNet), and every property holds
for both kinds."""

from __future__ import annotations

import builtins
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import moved_lqf
from workers.checkpoint import (
    BUILTIN,
    CheckpointError,
    expected_factory,
    factory_of,
    input_shape_of,
    load_model,
    save_model,
    sha256_file,
)
from workers.data import Split
from workers.lqf import LinearizedNet, fit_lqf, save_lqf
from workers.models import GracefulNet, UserNet, build_model
from workers.specs import ArchSpec, GenerationSpec, TrainSpec


def _net(seed: int):
    torch.manual_seed(seed)
    return build_model(ArchSpec(type="mlp", width=8, depth=1, embed_dim=4), 12, 3)


def _lqf(seed: int) -> LinearizedNet:
    return moved_lqf(_net(seed), scale=0.1).train()


def _save(kind: str, seed: int, path: Path) -> tuple[str, torch.nn.Module]:
    model = _net(seed) if kind == "plain" else _lqf(seed)
    sha = save_model(model, path) if kind == "plain" else save_lqf(model, path)
    return sha, model.eval()


KINDS = ["plain", "lqf"]


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("kind", KINDS)
def test_verified_checkpoint_loads(tmp_path, kind):
    sha, model = _save(kind, 0, tmp_path / "g")
    loaded, _ = load_model(tmp_path / "g", sha)
    assert type(loaded) is type(model) and _same(loaded, model)


@pytest.mark.parametrize("kind", KINDS)
def test_bytes_whose_hash_mismatches_are_refused(tmp_path, kind):
    sha, _ = _save(kind, 0, tmp_path / "g")
    other, _ = _save(kind, 1, tmp_path / "h")  # a valid checkpoint, just not the recorded one
    f = tmp_path / "g" / "model.pt"
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "g", other)
    msg = str(e.value)
    assert str(f) in msg and sha[:12] in msg and other[:12] in msg and "changed or truncated" in msg
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing", sha)


class _Opens:
    """Counts opens of one file through every door (`open`, `io.open`, which Path uses);
    `after_first` runs once the first open has returned (its handle keeps the old bytes)."""

    def __init__(self, monkeypatch, target: Path, after_first=None):
        self.target, self.after_first, self.count = target.resolve(), after_first, 0
        real = builtins.open

        def counting(file, *a, **kw):
            handle = real(file, *a, **kw)
            if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == self.target:
                self.count += 1
                if self.count == 1 and self.after_first is not None:
                    self.after_first()
            return handle

        monkeypatch.setattr(builtins, "open", counting)
        monkeypatch.setattr(io, "open", counting)


@pytest.mark.parametrize("kind", KINDS)
def test_the_file_is_read_exactly_once(tmp_path, monkeypatch, kind):
    sha, _ = _save(kind, 0, tmp_path / "g")
    opens = _Opens(monkeypatch, tmp_path / "g" / "model.pt")
    load_model(tmp_path / "g", sha)
    assert opens.count == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_retrain_landing_mid_load_cannot_slip_in_unverified_weights(tmp_path, monkeypatch, kind):
    """A retrain replaces model.pt (atomically, like save_model) right after the loader
    opened it: what is loaded must be the verified old model, never the new bytes."""
    sha, old = _save(kind, 0, tmp_path / "g")
    _, new = _save(kind, 1, tmp_path / "retrain")
    f = tmp_path / "g" / "model.pt"
    _Opens(monkeypatch, f, after_first=lambda: os.replace(tmp_path / "retrain" / "model.pt", f))
    loaded, _ = load_model(tmp_path / "g", sha)
    assert _same(loaded, old) and not _same(loaded, new)
    assert sha256_file(f) != sha  # the swap did happen


@pytest.mark.parametrize("kind,cls", [("plain", GracefulNet), ("lqf", LinearizedNet)])
def test_load_model_dispatches_on_the_checkpoint_kind(tmp_path, kind, cls):
    sha, model = _save(kind, 0, tmp_path / "g")
    loaded, meta = load_model(tmp_path / "g" / "model.pt", sha)
    assert type(loaded) is cls and not loaded.training
    assert (meta.get("recipe") == "lqf") == (kind == "lqf")
    # What serving reads off a model (ModelServer.info, LocalGeneration.describe, the router).
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert (loaded.input_dim, loaded.num_classes) == (12, 3)
        assert loaded(x).shape == (5, 3) and loaded.embed(x).shape == (5, 4)
        z, logits = loaded.embed_and_logits(x)
        torch.testing.assert_close(z, loaded.embed(x))
        torch.testing.assert_close(logits, loaded(x))


def test_an_unknown_kind_is_refused_naming_the_kind_and_the_file(tmp_path):
    _save("plain", 0, tmp_path / "g")
    f = tmp_path / "g" / "model.pt"
    blob = torch.load(f, weights_only=True)
    torch.save({**blob, "kind": "quantised"}, f)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "g", sha256_file(f))
    assert "'quantised'" in str(e.value) and str(f) in str(e.value)


def test_an_lqf_checkpoint_that_does_not_match_its_arch_is_refused(tmp_path):
    _save("lqf", 0, tmp_path / "g")
    f = tmp_path / "g" / "model.pt"
    blob = torch.load(f, weights_only=True)
    torch.save({**blob, "arch": {**blob["arch"], "width": 9}}, f)
    with pytest.raises(CheckpointError, match="does not match its architecture"):
        load_model(f, sha256_file(f))


# --- custom models: the file records the factory and the input shape ------------------------


IMAGE = (1, 6, 6)


def _custom(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ArchSpec(type="custom", factory=f"tests.factories:{name}", embed_dim=5, **kw), IMAGE, 3)


def _outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4, *IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.embed_and_logits(x)


@pytest.mark.parametrize("name,cls", [("backbone", GracefulNet), ("own_heads", UserNet)])
def test_custom_models_round_trip_with_identical_outputs(tmp_path, name, cls):
    model = _custom(name, kwargs={"width": 3} if name == "backbone" else {"dim": 9}).eval()
    sha = save_model(model, tmp_path / "g")
    loaded, _ = load_model(tmp_path / "g", sha, factory=f"tests.factories:{name}")
    assert type(loaded) is cls and loaded.input_shape == IMAGE and loaded.num_classes == 3
    for a, b in zip(_outputs(loaded), _outputs(model)):
        assert torch.equal(a, b)


def test_the_file_records_the_input_shape_and_the_factory(tmp_path):
    save_model(_custom("own_heads", kwargs={"dim": 9}), tmp_path / "g")
    blob = torch.load(tmp_path / "g" / "model.pt", weights_only=True)
    assert blob["input_shape"] == list(IMAGE) and "input_dim" not in blob
    assert blob["arch"]["type"] == "custom"
    assert blob["arch"]["factory"] == "tests.factories:own_heads" and blob["arch"]["kwargs"] == {"dim": 9}
    assert factory_of(blob) == "tests.factories:own_heads" and input_shape_of(blob) == IMAGE
    save_model(build_model(ArchSpec(type="cnn2d", width=2, depth=1), IMAGE, 3), tmp_path / "b")
    builtin = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert factory_of(builtin) == BUILTIN == expected_factory(ArchSpec(type="cnn2d"))
    assert expected_factory(ArchSpec(type="custom", factory="a.b:c")) == "a.b:c"


def test_a_checkpoint_of_another_factory_is_refused_naming_both(tmp_path):
    sha = save_model(_custom("own_heads"), tmp_path / "g")
    f = tmp_path / "g" / "model.pt"
    for other in ("tests.factories:backbone", BUILTIN):
        with pytest.raises(CheckpointError) as e:
            load_model(tmp_path / "g", sha, factory=other)
        msg = str(e.value)
        assert "tests.factories:own_heads" in msg and other in msg and str(f) in msg and "refusing" in msg
    # A built-in checkpoint is refused by a config naming a factory, and loads with BUILTIN.
    save_model(_net(0), tmp_path / "b")
    with pytest.raises(CheckpointError, match=r"built by factory \(built-in\), the config names tests.factories:x"):
        load_model(tmp_path / "b", factory="tests.factories:x")
    assert type(load_model(tmp_path / "b", factory=BUILTIN)[0]) is GracefulNet


def _import_recorder(tmp_path: Path, monkeypatch, module: str) -> Path:
    """A factory module that records, in a file, each time it is imported."""
    pkg = tmp_path / "user_code"
    pkg.mkdir()
    marker = tmp_path / "imported"
    (pkg / f"{module}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('yes')\n"
        "from tests.factories import own_heads as build\n")
    monkeypatch.syspath_prepend(str(pkg))
    return marker


def test_a_mismatching_factory_is_refused_before_it_is_imported(tmp_path, monkeypatch):
    module = "graceful_ckpt_recorder_a"
    marker = _import_recorder(tmp_path, monkeypatch, module)
    blob = torch.load(_saved_own_heads(tmp_path), weights_only=True)
    blob["arch"]["factory"] = f"{module}:build"
    torch.save(blob, tmp_path / "g" / "model.pt")
    try:
        with pytest.raises(CheckpointError, match="refusing"):
            load_model(tmp_path / "g", factory="tests.factories:own_heads")
        assert not marker.exists() and module not in sys.modules
        # The same file, with the factory it names expected: imported, and it loads.
        loaded, _ = load_model(tmp_path / "g", factory=f"{module}:build")
        assert marker.exists() and type(loaded) is UserNet
    finally:
        sys.modules.pop(module, None)


def _saved_own_heads(tmp_path: Path) -> Path:
    save_model(_custom("own_heads"), tmp_path / "g")
    return tmp_path / "g" / "model.pt"


def test_a_checkpoint_whose_factory_does_not_import_is_refused_naming_it(tmp_path):
    f = _saved_own_heads(tmp_path)
    blob = torch.load(f, weights_only=True)
    blob["arch"]["factory"] = "nonexistent_pkg_xyz.m:f"
    torch.save(blob, f)
    for expected in (None, "nonexistent_pkg_xyz.m:f"):
        with pytest.raises(CheckpointError) as e:
            load_model(f, factory=expected)
        msg = str(e.value)
        assert str(f) in msg and "'nonexistent_pkg_xyz.m:f'" in msg and "cannot import" in msg


def test_a_legacy_file_with_input_dim_and_no_input_shape_still_loads(tmp_path):
    """Files written before input shapes existed: `input_dim` and an arch without
    factory/kwargs (as save_model wrote them then)."""
    model = _net(0).eval()
    arch = {k: v for k, v in model.spec.model_dump(mode="json").items() if k not in ("factory", "kwargs")}
    blob = {"format": 1, "arch": arch, "input_dim": 12, "num_classes": 3,
            "state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "meta": {"generation": "old"}}
    torch.save(blob, tmp_path / "legacy.pt")
    loaded, meta = load_model(tmp_path / "legacy.pt", sha256_file(tmp_path / "legacy.pt"), factory=BUILTIN)
    assert type(loaded) is GracefulNet and loaded.input_shape == (12,) and meta == {"generation": "old"}
    assert _same(loaded, model)


def _lqf_fit(parent: torch.nn.Module) -> torch.nn.Module:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, *IMAGE)).astype(np.float32)
    y = (x[:, 0, 0, 0] > 0).astype(np.int64) + (x[:, 0, 1, 1] > 0).astype(np.int64)
    gen = GenerationSpec(name="g1", arch=parent.spec, recipe="lqf", train=TrainSpec(steps=3, batch_size=16, lr=0.05))
    return fit_lqf(parent, Split(x, y), gen)


@pytest.mark.parametrize("name", ["cnn2d", "backbone", "own_heads"])
def test_lqf_checkpoints_of_cnn2d_and_custom_models_round_trip(tmp_path, name):
    if name == "cnn2d":
        torch.manual_seed(0)
        parent = build_model(ArchSpec(type="cnn2d", width=3, depth=2, embed_dim=5), IMAGE, 3)
    else:
        parent = _custom(name)
    lin = _lqf_fit(parent)
    assert any(d.abs().sum() > 0 for d in lin.delta)  # it moved away from the parent
    sha = save_lqf(lin, tmp_path / "g1")
    expected = BUILTIN if name == "cnn2d" else f"tests.factories:{name}"
    loaded, meta = load_model(tmp_path / "g1", sha, factory=expected)
    assert type(loaded) is LinearizedNet and meta["recipe"] == "lqf" and loaded.input_shape == IMAGE
    for a, b in zip(_outputs(loaded), _outputs(lin)):
        assert torch.equal(a, b)
    z = _outputs(lin)[0]
    with torch.no_grad():
        assert torch.equal(loaded.head(z), lin.head(z))
