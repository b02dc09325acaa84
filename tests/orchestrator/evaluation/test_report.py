"""The per-candidate report: markdown with four PNG plots, numbers matching the evaluation."""

from __future__ import annotations

import numpy as np

from orchestrator.config import load_config
from orchestrator.evaluation.evaluate import evaluate
from orchestrator.registry import Registry, registry_path
from orchestrator.evaluation.report import chain_summary, plot_compat, write_report
from tests.orchestrator.evaluation.test_evaluate import make_chain

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_files_and_contents(tmp_path):
    path = make_chain(tmp_path)
    cfg = load_config(path)
    ev = evaluate(cfg, "g2", n_boot=50)
    with Registry(registry_path(cfg)) as reg:
        md = write_report(cfg, ev, reg)
        summary = chain_summary(cfg, reg)
    assert md == cfg.run_dir / "reports" / "g2.md"
    text = md.read_text()
    assert text.startswith("# g2: offline gate against g0 -- FAIL")
    for kind in ("flips", "class-nfr", "chain", "compat", "chain-compat"):
        png = md.parent / f"g2-{kind}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
        assert f"]({png.name})" in text
    assert f"{ev.metrics['nfr'] * 100:.2f}%" in text and "Lineage: g0 -> g2" in text
    # each check's row shows its bounds and limit
    assert "| gate key | value | lower bound | upper bound | limit | verdict |" in text
    for ch in ev.checks:
        assert f"| `{ch.key}` | {ch.value:.4f} | {ch.lower:.4f} | {ch.upper:.4f} | {ch.limit:.4f} |" in text
    # an inconclusive verdict says so and what to do
    tight = cfg.model_copy(update={"gates": cfg.gates.model_copy(update={"max_nfr": 0.02})})
    ev1 = evaluate(tight, "g1", n_boot=20)
    with Registry(registry_path(cfg)) as reg:
        text1 = write_report(tight, ev1, reg).read_text()
    assert ev1.verdict == "inconclusive" and text1.startswith("# g1: offline gate against g0 -- INCONCLUSIVE")
    assert "*inconclusive*" in text1 and "gates.allow_inconclusive" in text1
    # chain rows: every trained generation, NFR against its parent (none for g0)
    assert [(r["name"], r["parent"]) for r in summary["rows"]] == [("g0", None), ("g1", "g0"), ("g2", "g0")]
    m = np.asarray(summary["compat"])
    assert m.shape == (3, 3) and np.all((m >= 0) & (m <= 1))
    # each model retrieves best from its own gallery
    assert all(m[i, i] >= m[i].max() - 0.05 for i in range(3))


def test_compat_plot_marks_incomparable_pairs(tmp_path):
    m = np.array([[0.9, np.nan], [np.nan, 0.8]])
    plot_compat(["a", "b"], m, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
