"""The committed benchmark results keep the row contracts that checks outside this
repository read (docs/benchmarks.md): every key present, rates as fractions, every regime
and the reference methods there, one row per (regime, method, seed). Reads JSON only."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _rows(name: str) -> list[dict]:
    rows = json.loads((RESULTS / name).read_text())
    assert isinstance(rows, list) and rows, name
    return rows


def _check_rates(rows: list[dict], keys: tuple[str, ...]) -> None:
    for r in rows:
        for k in keys:
            assert isinstance(r[k], (int, float)) and 0.0 <= r[k] <= 1.0, (k, r)


def test_nfr_pareto_rows_cover_every_regime_with_five_seeds():
    rows = _rows("nfr_pareto.json")
    for r in rows:
        assert {"regime", "method", "seed", "error", "nfr", "pfr", "train_seconds"} <= set(r), r
    _check_rates(rows, ("error", "nfr", "pfr"))
    keys = Counter((r["regime"], r["method"], r["seed"]) for r in rows)
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]
    regimes = {r["regime"] for r in rows}
    assert regimes == {"close", "arch_upgrade", "large_jump", "image"}
    for g in regimes:
        methods = {r["method"] for r in rows if r["regime"] == g}
        assert {"plain", "ensemble_served", "fd_official", "fd_tuned", "ensemble_distill"} <= methods, g
        for m in methods:
            seeds = {r["seed"] for r in rows if r["regime"] == g and r["method"] == m}
            assert len(seeds) >= 5, (g, m, seeds)
    assert {r["method"] for r in rows if r["regime"] == "close"} >= {"bcwi"}


def test_lqf_rows_cover_both_regimes_with_three_seeds():
    rows = _rows("lqf.json")
    for r in rows:
        assert {"regime", "method", "seed", "error", "nfr"} <= set(r), r
    _check_rates(rows, ("error", "nfr"))
    for g in ("pretrained", "weak_parent"):
        for m in ("finetune", "lqf"):
            seeds = {r["seed"] for r in rows if r["regime"] == g and r["method"] == m}
            assert len(seeds) >= 3, (g, m, seeds)


@pytest.mark.parametrize("name", ["nfr_pareto.json", "lqf.json", "rollout_sim.json"])
def test_results_are_plain_json_lists(name):
    assert all(isinstance(r, dict) for r in _rows(name))


def test_registry_backends_rows_compare_both_backends_on_every_operation():
    data = json.loads((RESULTS / "registry_backends.json").read_text())
    rows = {(r["backend"], r["op"]): r for r in data["rows"]}
    assert set(rows) == {(b, op) for b in ("sqlite", "postgresql")
                         for op in ("audit", "transition", "pass_reads", "two_writers")}
    for r in rows.values():
        assert r["n"] > 0 and r["per_s"] > 0
        if r["op"] != "two_writers":
            assert 0 < r["p50_ms"] <= r["p99_ms"], r
