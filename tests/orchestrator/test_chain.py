"""Which older models constrain a generation: the registry's history, never the YAML's
order; and CLI errors of `graceful train` (no Ray)."""

from __future__ import annotations

import pytest

from orchestrator.chain import (ChainError, Constraints, ancestors, build_job, constraint_names, constraints_of,
                                next_untrained, training_hash)
from orchestrator.cli import main
from orchestrator.config import parse_config
from orchestrator.registry import Registry, registry_path


def _cfg(tmp_path, against="ancestors", gallery=None, n=5, **extra):
    gens = [{"name": f"g{k}", **({"compat": {"bct": {"against": against, "decay": 0.5}}} if k else {})}
            for k in range(n)]
    raw = {"run_dir": str(tmp_path), "generations": gens, **extra}
    if gallery:
        raw["gallery_generation"] = gallery
    return parse_config(raw)


def _sha(name: str) -> str:
    return (name.encode().hex() * 64)[:64]


class History:
    """A registry lived through by hand: g0 bootstrapped, then rollouts that end promoted
    or rolled back (what the controller records)."""

    def __init__(self, cfg):
        self.reg = Registry(registry_path(cfg))
        self.reg.add_generation("g0", None, "mlp", "h", "/x/g0.pt", _sha("g0"))
        assert self.reg.bootstrap_production("g0", "test")

    def roll_out(self, name: str, outcome: str) -> None:
        prod = self.reg.production().name
        self.reg.add_generation(name, prod, "mlp", "h", f"/x/{name}.pt", _sha(name))
        r = self.reg.start_rollout(name, prod, "test", "go")
        self.reg.transition(r.id, ("shadow", 0), state=outcome, step=1, weight=1.0 if outcome == "promoted" else 0.0,
                            actor="test", action=outcome, reason="test")


def test_parent_and_ancestors_come_from_the_registry_not_the_yaml(tmp_path):
    """g0 -> g1 promoted -> g2 promoted -> g3 rolled back; g4 is trained against production
    g2, with the ever-production ancestors g2, g1, g0 at distances 1, 2, 3:
    0.5^d = .5, .25, .125 -> /0.875 = 4/7, 2/7, 1/7. g3 (rolled back) is nowhere."""
    cfg = _cfg(tmp_path)
    h = History(cfg)
    h.roll_out("g1", "promoted")
    h.roll_out("g2", "promoted")
    h.roll_out("g3", "rolled_back")
    c = constraints_of(cfg, h.reg, "g4")
    assert c.parent == "g2" and c.production.sha256 == _sha("g2")
    assert [m.name for m in c.bct] == ["g2", "g1", "g0"]
    assert [m.importance for m in c.bct] == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert "g3" not in ancestors(cfg, h.reg, "g4")
    job = build_job(cfg, "g4", registry=h.reg)
    assert job.production.name == "g2" and [b.name for b in job.bct] == ["g2", "g1", "g0"]
    assert job.out_dir.startswith(str(tmp_path.resolve()))          # absolute: Ray workers run elsewhere


def test_production_only_still_includes_the_gallery_model(tmp_path):
    """against: production -> production g2 plus the gallery's model g0 (distance 3):
    .5 and .125 -> 0.8 and 0.2."""
    cfg = _cfg(tmp_path, "production")
    h = History(cfg)
    h.roll_out("g1", "promoted")
    h.roll_out("g2", "promoted")
    got = constraint_names(cfg, h.reg, "g3")
    assert [n for n, _ in got] == ["g2", "g0"]
    assert [w for _, w in got] == pytest.approx([0.8, 0.2])


def test_a_rolled_back_generation_is_never_a_parent_even_as_the_gallery(tmp_path):
    cfg = _cfg(tmp_path, gallery="g1")
    h = History(cfg)
    h.roll_out("g1", "rolled_back")
    c = constraints_of(cfg, h.reg, "g2")
    assert c.parent == "g0" and [m.name for m in c.bct] == ["g0"]


def test_nothing_in_production_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path)
    assert next_untrained(cfg) == "g0"
    with pytest.raises(ChainError, match=r"run `graceful train CONFIG --generation g0` first"):
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
    assert job.run_name == f"g0-{training_hash(cfg, 'g0', Constraints('g0', None))[:10]}"
    uri = parse_config({"run_dir": str(tmp_path), "generations": [{"name": "g0"}],
                        "scaling": {"storage_path": "s3://bucket/graceful"}})
    assert build_job(uri, "g0").storage_path == "s3://bucket/graceful"


def test_a_relative_run_dir_is_made_absolute_at_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_config({"run_dir": "runs/x", "generations": [{"name": "g0"}]})
    assert cfg.run_dir == tmp_path.resolve() / "runs" / "x"


def test_bct_against_another_embedding_size_is_a_config_error(tmp_path, capsys):
    """g1 (embed 32) constrained by BCT against production g0 (embed 64): refused before
    any training, naming the key; exit 2 on the CLI."""
    p = tmp_path / "c.yaml"
    p.write_text(f"run_dir: {tmp_path / 'run'}\ngenerations:\n  - {{name: g0}}\n"
                 "  - {name: g1, arch: {embed_dim: 32}, compat: {bct: {weight: 1.0}}}\n")
    cfg = parse_config({"run_dir": str(tmp_path / "run"),
                        "generations": [{"name": "g0"}, {"name": "g1", "arch": {"embed_dim": 32},
                                                         "compat": {"bct": {"weight": 1.0}}}]})
    History(cfg).reg.close()
    with pytest.raises(ValueError, match=r"generations\[1\].arch.embed_dim: 32, but BCT against 'g0' needs 64"):
        build_job(cfg, "g1")
    assert main(["train", str(p), "--generation", "g1"]) == 2
    assert "BCT against 'g0' needs 64" in capsys.readouterr().err


def test_training_hash_covers_what_determines_the_weights_only(tmp_path):
    base = {"run_dir": str(tmp_path), "generations": [{"name": "g0"}, {"name": "g1"}]}
    cfg = parse_config(base)
    none = Constraints("g1", None)
    h = History(cfg)
    against_g0 = constraints_of(cfg, h.reg, "g1")
    h1 = training_hash(cfg, "g1", against_g0)
    assert h1 != training_hash(cfg, "g1", none) != training_hash(cfg, "g0", Constraints("g0", None))
    # Serving, rollout, gates, scaling and run_dir never force a retrain.
    other = parse_config({**base, "run_dir": str(tmp_path / "x"), "serving": {"port": 9001},
                          "rollout": {"nfr_limit": 0.05}, "gates": {"max_nfr": 0.5}, "scaling": {"num_workers": 1}})
    assert training_hash(other, "g1", against_g0) == h1
    # Its own recipe, the data and the exact bytes it is constrained against do.
    g1_lr = parse_config({**base, "generations": [{"name": "g0"}, {"name": "g1", "train": {"lr": 0.01}}]})
    assert training_hash(g1_lr, "g1", against_g0) != h1
    assert training_hash(parse_config({**base, "data": {"seed": 3}}), "g1", against_g0) != h1
    retrained = Constraints("g1", against_g0.production.__class__("g0", "/x/g0.pt", "e" * 64))
    assert training_hash(cfg, "g1", retrained) != h1
    # An earlier generation's recipe in the YAML does not: only what it was trained into.
    g0_lr = parse_config({**base, "generations": [{"name": "g0", "train": {"lr": 0.01}}, {"name": "g1"}]})
    assert training_hash(g0_lr, "g1", against_g0) == h1
    h.reg.close()
