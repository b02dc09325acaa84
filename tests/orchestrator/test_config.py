"""Config loading: every shipped YAML loads; every kind of bad file exits 2 with key paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config
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
