"""Which older models constrain a generation, and CLI errors of `graceful train` (no Ray)."""

from __future__ import annotations

import pytest

from orchestrator.chain import ChainError, build_job, constraint_names, next_untrained, training_hash
from orchestrator.cli import main
from orchestrator.config import parse_config


def _cfg(tmp_path, against="ancestors", gallery=None):
    gens = [{"name": f"g{k}", **({"compat": {"bct": {"against": against, "decay": 0.5}}} if k else {})}
            for k in range(4)]
    raw = {"run_dir": str(tmp_path), "generations": gens}
    if gallery:
        raw["gallery_generation"] = gallery
    return parse_config(raw)


def test_ancestors_weighted_by_distance(tmp_path):
    """g3's ancestors g2, g1, g0 at distances 1, 2, 3: 0.5^d = .5, .25, .125 -> /0.875 = 4/7, 2/7, 1/7."""
    got = constraint_names(_cfg(tmp_path), "g3")
    assert [n for n, _ in got] == ["g2", "g1", "g0"]
    assert [w for _, w in got] == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_production_only_still_includes_the_gallery_model(tmp_path):
    """against: production -> the parent g2 plus the gallery's model g0 (distance 3):
    .5 and .125 -> 0.8 and 0.2."""
    got = constraint_names(_cfg(tmp_path, "production"), "g3")
    assert [n for n, _ in got] == ["g2", "g0"]
    assert [w for _, w in got] == pytest.approx([0.8, 0.2])
    assert constraint_names(_cfg(tmp_path, "production"), "g1") == [("g0", 1.0)]
    assert constraint_names(_cfg(tmp_path), "g0") == []


def test_untrained_parent_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path)
    assert next_untrained(cfg) == "g0"
    with pytest.raises(ChainError, match="'g0' is not trained yet"):
        build_job(cfg, "g1")


def test_cli_train_errors(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(f"run_dir: {tmp_path / 'run'}\ngenerations: [{{name: g0}}, {{name: g1}}]\n")
    assert main(["train", str(p), "--generation", "g9"]) == 2
    assert "unknown generation 'g9'" in capsys.readouterr().err
    assert main(["train", str(p), "--generation", "g1"]) == 1
    assert "run `graceful train CONFIG --generation g0` first" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("generations: [{name: g0, train: {steps: 0}}]\n")
    assert main(["train", str(bad)]) == 2


def test_ray_storage_defaults_to_the_run_dir_and_takes_a_uri(tmp_path):
    cfg = _cfg(tmp_path)
    job = build_job(cfg, "g0")
    assert job.storage_path == str(tmp_path.resolve() / "ray")
    assert job.run_name == f"g0-{training_hash(cfg, 'g0')[:10]}"
    uri = parse_config({"run_dir": str(tmp_path), "generations": [{"name": "g0"}],
                        "scaling": {"storage_path": "s3://bucket/graceful"}})
    assert build_job(uri, "g0").storage_path == "s3://bucket/graceful"


def test_bct_against_another_embedding_size_is_a_config_error(tmp_path, capsys):
    """g1 (embed 32) constrained by BCT against g0 (embed 64): refused before any training,
    naming the key; exit 2 on the CLI."""
    p = tmp_path / "c.yaml"
    p.write_text(f"run_dir: {tmp_path / 'run'}\ngenerations:\n  - {{name: g0}}\n"
                 "  - {name: g1, arch: {embed_dim: 32}, compat: {bct: {weight: 1.0}}}\n")
    cfg = parse_config({"run_dir": str(tmp_path / "run"),
                        "generations": [{"name": "g0"}, {"name": "g1", "arch": {"embed_dim": 32},
                                                         "compat": {"bct": {"weight": 1.0}}}]})
    with pytest.raises(ValueError, match=r"generations\[1\].arch.embed_dim: 32, but BCT against 'g0' needs 64"):
        build_job(cfg, "g1")
    assert main(["train", str(p), "--generation", "g1"]) == 2
    assert "BCT against 'g0' needs 64" in capsys.readouterr().err


def test_training_hash_covers_what_determines_the_weights_only(tmp_path):
    base = {"run_dir": str(tmp_path), "generations": [{"name": "g0"}, {"name": "g1"}]}
    cfg = parse_config(base)
    h0, h1 = training_hash(cfg, "g0"), training_hash(cfg, "g1")
    assert h0 != h1
    # Serving, rollout, gates, scaling and run_dir never force a retrain.
    other = parse_config({**base, "run_dir": str(tmp_path / "x"), "serving": {"port": 9001},
                          "rollout": {"nfr_limit": 0.05}, "gates": {"max_nfr": 0.5}, "scaling": {"num_workers": 1}})
    assert (training_hash(other, "g0"), training_hash(other, "g1")) == (h0, h1)
    # A later generation's recipe changes only its own hash; an earlier one's changes both
    # (it is among the later one's constraints).
    g1_lr = parse_config({**base, "generations": [{"name": "g0"}, {"name": "g1", "train": {"lr": 0.01}}]})
    assert (training_hash(g1_lr, "g0"), training_hash(g1_lr, "g1") != h1) == (h0, True)
    g0_lr = parse_config({**base, "generations": [{"name": "g0", "train": {"lr": 0.01}}, {"name": "g1"}]})
    assert training_hash(g0_lr, "g0") != h0 and training_hash(g0_lr, "g1") != h1
    assert training_hash(parse_config({**base, "data": {"seed": 3}}), "g0") != h0
