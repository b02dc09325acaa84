"""The Python API's pure parts (no Ray): factories by name, data from Python, the run's
config file. The lifecycle through it runs in tests/integration/test_examples.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

import graceful
from orchestrator.api import CONFIG_FILE, Run, data_spec, factory_path
from tests import factories
from workers.data import load_dataset
from workers.specs import DataSpec


def test_factory_path_of_a_module_function_is_its_import_path():
    assert factory_path(factories.backbone) == "tests.factories:backbone"
    assert factory_path("pkg.mod:fn") == "pkg.mod:fn"


@pytest.mark.parametrize("fn", [lambda s, c: None, factories.TinyBackbone(1, 2)], ids=["lambda", "instance"])
def test_factory_path_refuses_what_workers_cannot_import(fn):
    with pytest.raises(graceful.FactoryError):
        factory_path(fn)


def test_factory_path_refuses_a_function_defined_in_a_function():
    def local(shape, classes):
        return torch.nn.Identity()

    with pytest.raises(graceful.FactoryError, match="top level of an importable module"):
        factory_path(local)


def test_arrays_from_python_are_stored_once_by_content_and_load_as_given(tmp_path):
    x, y = factories.digits_images()
    a = data_spec((x, y), tmp_path)
    b = data_spec((x.copy(), y.copy()), tmp_path)
    assert a == b and a["source"] == "npz" and len(list((tmp_path / "data").glob("*.npz"))) == 1
    ds = load_dataset(DataSpec(**a))
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10


def test_splits_from_python_are_used_as_they_are(tmp_path):
    splits = factories.digits_splits()
    ds = load_dataset(DataSpec(**data_spec(splits, tmp_path)))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1200, 200, len(splits["test"][1]))
    np.testing.assert_array_equal(ds.test.y, splits["test"][1])


def test_bad_arrays_from_python_are_refused_naming_the_problem(tmp_path):
    x, y = factories.with_nan()
    with pytest.raises(graceful.DataError, match="NaN"):
        data_spec((x, y), tmp_path)
    with pytest.raises(graceful.DataError, match="'train' and 'test'"):
        data_spec({"train": factories.digits_images()}, tmp_path)


def test_a_data_factory_is_a_custom_source():
    assert data_spec(factories.digits_images, None) == {"source": "custom", "factory": "tests.factories:digits_images"}


def test_a_new_run_needs_data_and_known_sections(tmp_path):
    with pytest.raises(graceful.ConfigError, match="give `data`"):
        Run(tmp_path / "none")
    with pytest.raises(graceful.ConfigError, match="unknown section"):
        Run(tmp_path / "r", data="tests.factories:digits_images", servng={})


def test_a_bad_generation_is_refused_before_anything_is_written(tmp_path):
    run = Run(tmp_path / "r", data="tests.factories:digits_images")
    with pytest.raises(graceful.ConfigError) as e:
        run.train("g0", "tests.factories:backbone", train={"steps": 0})
    assert any("generations[0].train.steps" in p for p in e.value.problems)
    with pytest.raises(graceful.ConfigError, match="cannot import"):
        run.train("g0", "no_such_pkg_xyz.models:build")
    assert not (tmp_path / "r" / CONFIG_FILE).exists()


def test_a_run_reopened_keeps_its_config(tmp_path):
    run = Run(tmp_path / "r", data="tests.factories:digits_images", scaling={"num_workers": 1})
    run._raw["generations"].append({"name": "g0", "arch": {"type": "custom", "factory": "tests.factories:backbone"}})
    run._save(run._validate(run._raw))
    again = Run(tmp_path / "r")
    assert again.config.scaling.num_workers == 1 and again.config.generations[0].arch.factory == "tests.factories:backbone"
    on_disk = yaml.safe_load((tmp_path / "r" / CONFIG_FILE).read_text())
    assert on_disk["data"] == {"source": "custom", "factory": "tests.factories:digits_images"}


def test_evaluate_two_models_on_arrays_gives_the_gates_checks():
    from workers.models import build_model
    from workers.specs import ArchSpec

    x, y = factories.digits_images()
    torch.manual_seed(0)
    old = build_model(ArchSpec(type="cnn2d", width=4, depth=1), (1, 8, 8), 10)
    ev = graceful.evaluate(old, old, (x[:200], y[:200]), gates={"max_nfr": 0.0})
    assert ev.metrics["nfr"] == 0.0 and ev.metrics["error_change"] == 0.0
    assert {c.key for c in ev.checks} >= {"max_nfr", "max_error_increase"} and ev.evaluation_id is None
    # no flip in 200 rows still leaves NFR's upper bound above 0: max_nfr 0 can never be shown
    nfr = next(c for c in ev.checks if c.key == "max_nfr")
    assert nfr.verdict == "inconclusive" and nfr.lower == 0.0 < nfr.upper and ev.verdict == "inconclusive"


def test_a_run_keeps_its_data_new_data_goes_to_a_generation(tmp_path):
    run = Run(tmp_path / "r", data="tests.factories:digits_images")
    run._raw["generations"].append({"name": "g0", "arch": {"type": "mlp"}})
    run._save(run._validate(run._raw))
    Run(tmp_path / "r", data="tests.factories:digits_images")  # the same data: fine
    with pytest.raises(graceful.ConfigError, match="train_data"):
        Run(tmp_path / "r", data="tests.factories:digits_splits")


def test_relative_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    x, y = factories.digits_images()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    (tmp_path / "code").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    run = Run("runs/r", data={"source": "npz", "path": "d.npz"}, ray={"runtime_env": {"working_dir": "code"}})
    assert run._raw["data"]["path"] == str(tmp_path / "d.npz")
    assert run._raw["ray"]["runtime_env"]["working_dir"] == str(tmp_path / "code")


def test_evaluate_loads_a_custom_checkpoint_only_with_a_trusted_factory(tmp_path):
    from workers.checkpoint import save_model
    from workers.models import build_model
    from workers.specs import ArchSpec

    x, y = factories.digits_images()
    torch.manual_seed(0)
    m = build_model(ArchSpec(type="custom", factory="tests.factories:backbone"), (1, 8, 8), 10)
    save_model(m, tmp_path / "g")
    with pytest.raises(graceful.CheckpointError, match="tests.factories:backbone"):
        graceful.evaluate(tmp_path / "g", m, (x[:50], y[:50]))
    ev = graceful.evaluate(tmp_path / "g", m, (x[:50], y[:50]), factories=["tests.factories:backbone"])
    assert ev.metrics["nfr"] == 0.0
