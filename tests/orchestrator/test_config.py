"""Config loading: every shipped YAML loads; every kind of bad file exits 2 with key paths."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import (
    ConfigError,
    RuntimeEnvSpec,
    init_ray,
    load_config,
    parse_config,
)
from tests.conftest import ROOT

SHIPPED = sorted((ROOT / "config").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.generations and cfg.generations[0].name


def test_demo_has_a_chain_of_three():
    cfg = load_config(ROOT / "config" / "demo.yaml")
    assert [g.name for g in cfg.generations] == ["g0", "g1", "g2"]
    assert cfg.generation("g1").compat.bct is not None
    assert cfg.gallery == "g0"


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return e.value.problems


def test_all_problems_reported_at_once_with_key_paths(tmp_path):
    p = _write(tmp_path, """
run_dri: x
data: {source: mnist2d, num_samples: -5}
generations:
  - name: g0
    train: {lr: 0, stepz: 3}
    compat: {bct: {weight: 1}}
  - name: g0
    arch: {width: wide}
""")
    problems = _problems(p)
    joined = "\n".join(problems)
    assert "c.yaml: generations[0].train.lr: must be > 0" in problems
    assert "c.yaml: generations[0].train.stepz: unknown key (did you mean 'steps'?)" in problems
    assert "c.yaml: run_dri: unknown key (did you mean 'run_dir'?)" in problems
    assert "c.yaml: data.num_samples: must be > 0" in problems
    assert "data.source: must be one of" in joined
    assert "generations[1].arch.width: must be an integer" in joined
    assert "generations[1].name: duplicate name 'g0'" in joined
    assert "generations[0].compat.bct: the first generation has no production model" in joined
    assert all(line.startswith("c.yaml: ") for line in problems)


@pytest.mark.parametrize("text,expected", [
    ("", "c.yaml: file is empty"),
    ("a: [1,\n", "c.yaml: line 2, column 1: not valid YAML"),
    ("- 1\n- 2\n", "c.yaml: top level must be a mapping"),
    ("run_dir: x\n", "c.yaml: generations: required key is missing"),
    ("generations: []\n", "c.yaml: generations: must have at least 1 item"),
    ("generations: [{name: g0}]\nrollout: {steps: [{weight: 0.5}, {weight: 0.2}]}\n",
     "c.yaml: rollout.steps: step weights must increase strictly"),
    ("generations: [{name: g0}]\ndata: {source: npz}\n", "c.yaml: data: source 'npz' needs `path`"),
    ("generations: [{name: g0}]\ndata: {source: npz, path: missing.npz}\n", "c.yaml: data.path: file not found"),
    ("generations: [{name: 'bad name'}]\n", "c.yaml: generations[0].name: must match"),
    ("generations: [{name: g0}]\ngallery_generation: g9\n", "c.yaml: gallery_generation: unknown generation 'g9'"),
    ("generations: [{name: g0, recipe: lqf}]\n", "c.yaml: generations[0].recipe: lqf fine-tunes a parent"),
    ("generations: [{name: g0}]\nserving: {port: 70000}\n", "c.yaml: serving.port: must be <= 65535"),
    ("generations: [{name: g0}]\nscaling: {use_gpu: maybe}\n", "c.yaml: scaling.use_gpu: must be true or false"),
])
def test_malformed_files(tmp_path, text, expected):
    problems = _problems(_write(tmp_path, text))
    assert any(line.startswith(expected) for line in problems), problems


def test_missing_file_is_a_problem(tmp_path):
    assert _problems(tmp_path / "nope.yaml")[0].endswith("nope.yaml: file not found")


def test_npz_path_resolved_against_config_folder(tmp_path):
    import numpy as np

    np.savez(tmp_path / "mine.npz", x=np.zeros((10, 4)), y=np.arange(10) % 2)
    cfg = load_config(_write(tmp_path, "generations: [{name: g0}]\ndata: {source: npz, path: mine.npz}\n"))
    assert cfg.data.path == tmp_path / "mine.npz"


def test_config_hash_is_stable_and_sensitive(tmp_path):
    a = load_config(_write(tmp_path, "generations: [{name: g0}]\n", "a.yaml"))
    b = load_config(_write(tmp_path, "generations: [{name: g0}]\n", "b.yaml"))
    c = load_config(_write(tmp_path, "generations: [{name: g0, train: {lr: 0.1}}]\n", "c.yaml"))
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_cli_validate_exit_codes(tmp_path, capsys):
    assert main(["validate", str(ROOT / "config" / "demo.yaml")]) == 0
    assert "ok (3 generations" in capsys.readouterr().out
    bad = _write(tmp_path, "generations: [{name: g0, train: {lr: -1}}]\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "c.yaml: generations[0].train.lr: must be > 0"
    assert "Traceback" not in err
    assert main(["validate", "--json", str(bad)]) == 2
    import json

    assert json.loads(capsys.readouterr().out)["problems"] == ["c.yaml: generations[0].train.lr: must be > 0"]


def test_cli_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


# --- factories, kwargs and ray.runtime_env ---------------------------------------------------


NO_PKG = "nonexistent_pkg_xyz.m:f"


def _parse_problems(raw: dict, **kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(raw, name="c.yaml", **kw)
    return e.value.problems


@pytest.fixture
def clean_imports(monkeypatch):
    """sys.path as it was, and the test's own user modules (prefix `graceful_cfg_`) forgotten."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [m for m in sys.modules if m.startswith("graceful_cfg_")]:
        del sys.modules[name]


@pytest.mark.parametrize("arch,expected", [
    ({"type": "custom"}, "c.yaml: generations[0].arch: type 'custom' needs `factory: package.module:callable`"),
    ({"type": "cnn2d", "factory": "a.b:c"}, "c.yaml: generations[0].arch: `factory` and `kwargs` are for type custom, not 'cnn2d'"),
    ({"kwargs": {"w": 1}}, "c.yaml: generations[0].arch: `factory` and `kwargs` are for type custom, not 'cnn1d'"),
    ({"type": "custom", "factory": "mypkg/models.py"}, "c.yaml: generations[0].arch.factory: must match "),
])
def test_arch_factory_problems_are_one_line_with_key_paths(arch, expected):
    problems = _parse_problems({"generations": [{"name": "g0", "arch": arch}]})
    assert len(problems) == 1 and problems[0].startswith(expected) and "\n" not in problems[0], problems


def test_data_and_train_data_factory_problems_have_key_paths():
    problems = _parse_problems({"data": {"source": "custom"},
                                "generations": [{"name": "g0"}, {"name": "g1", "train_data": {"source": "ray"}}]})
    assert problems == ["c.yaml: data: source 'custom' needs `factory: package.module:callable`",
                        "c.yaml: generations[1].train_data: source 'ray' needs `factory: package.module:callable`"]


def test_factories_that_do_not_import_are_reported_together_at_load(tmp_path):
    p = _write(tmp_path, f"""
data: {{source: custom, factory: "nonexistent_pkg_xyz.d:load"}}
generations:
  - {{name: g0, arch: {{type: custom, factory: "{NO_PKG}"}}}}
  - {{name: g1, arch: {{type: custom, factory: "tests.factories:no_such_builder"}},
      train_data: {{source: custom, factory: "tests.factories:digits_images"}}}}
""")
    problems = _problems(p)
    assert len(problems) == 3, problems
    assert problems[0].startswith("c.yaml: data.factory: factory 'nonexistent_pkg_xyz.d:load': cannot import "
                                  "'nonexistent_pkg_xyz.d' (ModuleNotFoundError")
    assert problems[1].startswith(f"c.yaml: generations[0].arch.factory: factory '{NO_PKG}': cannot import")
    assert "ray.runtime_env" in problems[1]  # says how to ship the code
    assert problems[2] == ("c.yaml: generations[1].arch.factory: factory 'tests.factories:no_such_builder': "
                           "module 'tests.factories' has no attribute 'no_such_builder'")


def test_a_factory_module_whose_code_fails_is_a_cannot_import_problem(tmp_path, clean_imports):
    (tmp_path / "graceful_cfg_broken.py").write_text("raise RuntimeError('boom at import')\n")
    p = _write(tmp_path, "ray: {runtime_env: {working_dir: .}}\n"
                         "generations: [{name: g0, arch: {type: custom, factory: 'graceful_cfg_broken:build'}}]\n")
    assert _problems(p) == [("c.yaml: generations[0].arch.factory: factory 'graceful_cfg_broken:build': cannot import "
                             "'graceful_cfg_broken' (RuntimeError: boom at import); install it, put it on PYTHONPATH, "
                             "or ship it with ray.runtime_env (py_modules / working_dir)")]


def test_a_factory_that_does_not_import_is_reported_with_the_semantic_problems():
    problems = _parse_problems({"generations": [{"name": "g0", "arch": {"type": "custom", "factory": NO_PKG}},
                                                {"name": "g0"}]})
    assert any(line.startswith("c.yaml: generations[1].name: duplicate name") for line in problems)
    assert any(line.startswith("c.yaml: generations[0].arch.factory: ") for line in problems), problems


@pytest.mark.parametrize("kwargs,why", [({"f": object()}, "not JSON serializable"),
                                        ({"x": float("nan")}, "Out of range float"),
                                        ({"s": {1, 2}}, "set is not JSON serializable")])
def test_factory_kwargs_must_be_plain_json(kwargs, why):
    problems = _parse_problems({"generations": [{"name": "g0", "arch": {
        "type": "custom", "factory": "tests.factories:backbone", "kwargs": kwargs}}]})
    assert len(problems) == 1
    assert problems[0].startswith("c.yaml: generations[0].arch.kwargs: kwargs must be plain JSON values") and why in problems[0]
    data = _parse_problems({"data": {"source": "custom", "factory": "tests.factories:digits_images", "kwargs": kwargs},
                            "generations": [{"name": "g0"}]})
    assert data[0].startswith("c.yaml: data.kwargs: kwargs must be plain JSON values")


def test_yaml_nan_in_kwargs_is_refused(tmp_path):
    p = _write(tmp_path, "generations: [{name: g0, arch: {type: custom, factory: 'tests.factories:backbone', "
                         "kwargs: {width: .nan}}}]\n")
    assert _problems(p)[0].startswith("c.yaml: generations[0].arch.kwargs: kwargs must be plain JSON values")


def test_a_custom_config_loads_and_keeps_its_kwargs(tmp_path):
    p = _write(tmp_path, """
data: {source: custom, factory: "tests.factories:first_classes", kwargs: {classes: 4}, num_classes: 6}
generations:
  - {name: g0, arch: {type: custom, factory: "tests.factories:backbone", kwargs: {width: 3}, embed_dim: 8}}
  - {name: g1, arch: {type: cnn2d, width: 4}, train_data: {source: custom, factory: "tests.factories:digits_images"}}
""")
    cfg = load_config(p)
    assert cfg.data.kwargs == {"classes": 4} and cfg.data.num_classes == 6
    assert cfg.generations[0].arch.factory == "tests.factories:backbone" and cfg.generations[0].arch.kwargs == {"width": 3}
    assert cfg.generations[1].train_data.factory == "tests.factories:digits_images"
    changed = load_config(_write(tmp_path, p.read_text().replace("width: 3", "width: 5"), "d.yaml"))
    assert changed.config_hash() != cfg.config_hash()  # kwargs are part of the recorded config


def test_working_dir_is_made_absolute_relative_to_the_config_file(tmp_path, clean_imports):
    (tmp_path / "code").mkdir()
    sub = tmp_path / "conf"
    sub.mkdir()
    cfg = load_config(_write(sub, "ray: {runtime_env: {working_dir: ../code}}\ngenerations: [{name: g0}]\n"))
    env = cfg.ray.runtime_env
    assert env.working_dir == tmp_path / "code" and env.working_dir.is_absolute()
    assert env.as_ray() == {"working_dir": str(tmp_path / "code")}
    assert str(tmp_path / "code") in sys.path  # the driver imports from it too
    problems = _problems(_write(sub, "ray: {runtime_env: {working_dir: nowhere, py_modules: [gone]}}\n"
                                     "generations: [{name: g0}]\n"))
    assert problems == [f"c.yaml: ray.runtime_env.working_dir: not found: {sub / 'nowhere'}",
                        f"c.yaml: ray.runtime_env.py_modules[0]: not found: {sub / 'gone'}"]


def test_every_missing_py_module_is_reported_with_its_index(tmp_path):
    (tmp_path / "here").mkdir()
    problems = _problems(_write(tmp_path, "ray: {runtime_env: {py_modules: [here, gone1, gone2]}}\n"
                                          "generations: [{name: g0}]\n"))
    assert problems == [f"c.yaml: ray.runtime_env.py_modules[1]: not found: {tmp_path / 'gone1'}",
                        f"c.yaml: ray.runtime_env.py_modules[2]: not found: {tmp_path / 'gone2'}"]


def _user_package(root: Path, name: str) -> Path:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text("from tests.factories import backbone as build\n")
    return pkg


def test_py_modules_go_on_sys_path_so_their_factories_import(tmp_path, clean_imports):
    _user_package(tmp_path / "shipped", "graceful_cfg_pkg")
    text = "generations: [{name: g0, arch: {type: custom, factory: 'graceful_cfg_pkg.models:build'}}]\n"
    problems = _problems(_write(tmp_path, text))  # not importable without the runtime_env
    assert len(problems) == 1 and "cannot import 'graceful_cfg_pkg.models'" in problems[0]
    cfg = load_config(_write(tmp_path, "ray: {runtime_env: {py_modules: [shipped/graceful_cfg_pkg]}}\n" + text, "d.yaml"))
    assert cfg.ray.runtime_env.py_modules == [tmp_path / "shipped" / "graceful_cfg_pkg"]
    assert cfg.ray.runtime_env.import_paths() == [tmp_path / "shipped"]
    assert str(tmp_path / "shipped") in sys.path
    from workers.models import GracefulNet, build_model

    assert type(build_model(cfg.generations[0].arch, (1, 8, 8), 3)) is GracefulNet


def test_runtime_env_as_ray(tmp_path):
    assert RuntimeEnvSpec().as_ray() is None and RuntimeEnvSpec().import_paths() == []
    (tmp_path / "wd").mkdir()
    _user_package(tmp_path / "mods", "graceful_cfg_unused")
    env = RuntimeEnvSpec.model_validate({"working_dir": "wd", "py_modules": ["mods/graceful_cfg_unused"],
                                         "pip": ["einops==0.8.0"], "env_vars": {"OMP_NUM_THREADS": "1"}},
                                        context={"base_dir": tmp_path})
    ray_env = env.as_ray()
    assert ray_env == {"working_dir": str(tmp_path / "wd"), "py_modules": [str(tmp_path / "mods" / "graceful_cfg_unused")],
                       "pip": ["einops==0.8.0"], "env_vars": {"OMP_NUM_THREADS": "1"}}
    json.dumps(ray_env)  # plain values, as ray.init takes them
    assert env.import_paths() == [tmp_path / "wd", tmp_path / "mods"]
    assert RuntimeEnvSpec(pip=["x"]).as_ray() == {"pip": ["x"]}


def test_init_ray_passes_the_runtime_env(tmp_path, monkeypatch, clean_imports):
    """ray.init replaced by a recorder: nothing starts."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    (tmp_path / "wd").mkdir()
    cfg = load_config(_write(tmp_path, "ray: {runtime_env: {working_dir: wd, env_vars: {A: b}}}\n"
                                       "generations: [{name: g0}]\n"))
    init_ray(cfg, address="auto", log_to_driver=True)
    assert calls == [{"address": "auto", "include_dashboard": False, "log_to_driver": True, "configure_logging": False,
                      "runtime_env": {"working_dir": str(tmp_path / "wd"), "env_vars": {"A": "b"}}}]
    init_ray(load_config(_write(tmp_path, "generations: [{name: g0}]\n", "d.yaml")))
    assert "runtime_env" not in calls[1] and calls[1]["address"] is None


def test_cli_validate_exits_2_for_a_factory_that_does_not_import(tmp_path, capsys):
    bad = _write(tmp_path, f"generations: [{{name: g0, arch: {{type: custom, factory: '{NO_PKG}'}}}}]\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"c.yaml: generations[0].arch.factory: factory '{NO_PKG}': cannot import")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["validate", "--json", str(bad)]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["problems"][0].startswith("c.yaml: generations[0].arch.factory: ")
    good = _write(tmp_path, "generations: [{name: g0, arch: {type: custom, factory: 'tests.factories:own_heads'}}]\n",
                  "good.yaml")
    assert main(["validate", str(good)]) == 0


def test_ensemble_distillation_on_a_stream_is_refused_at_load():
    raw = {"data": {"source": "ray", "factory": "tests.factories:digits_images", "num_classes": 10},
           "generations": [{"name": "g0"}, {"name": "g1", "compat": {"ensemble": {}}},
                           {"name": "g2", "compat": {"ensemble": {}},
                            "train_data": {"source": "custom", "factory": "tests.factories:digits_images"}}]}
    with pytest.raises(ConfigError) as e:
        parse_config(raw, name="c.yaml")
    assert [p.split(": ")[1] for p in e.value.problems] == ["generations[1].compat.ensemble"]
