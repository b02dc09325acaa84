"""Checkpoint loading verifies the bytes it loads: the file is read once, hashed, and
`torch.load`ed from memory, so a retrain replacing model.pt between the check and the load
cannot slip unverified weights in. `load_model` is the one loader: it dispatches on the
checkpoint's kind (plain -> GracefulNet, lqf -> LinearizedNet), and every property holds
for both kinds."""

from __future__ import annotations

import builtins
import io
import os
from pathlib import Path

import pytest
import torch

from workers.checkpoint import CheckpointError, load_model, save_model, sha256_file
from workers.lqf import LinearizedNet, save_lqf
from tests.helpers import moved_lqf
from workers.models import GracefulNet, build_model
from workers.specs import ArchSpec


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
