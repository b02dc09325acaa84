"""A readable report per evaluated candidate: `run_dir/reports/<candidate>.md` and its PNGs.

Plots (matplotlib, Agg): the flip matrix as a heatmap, per-class NFR bars against the
gate's limit, error vs NFR of every trained generation of the chain (each against its
parent, the production model it was trained to replace), and the chain's
cross-compatibility matrix M(query generation, gallery generation) with faiss.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Optional

import numpy as np

import orchestrator.evaluation.metrics as M
from orchestrator.config import RunConfig
from orchestrator.evaluation.evaluate import INCONCLUSIVE_HINT, Evaluation, outputs
from orchestrator.registry import Registry
from orchestrator.rundir import reports_dir


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


# --- data for the chain plots -------------------------------------------------------------

def chain_summary(cfg: RunConfig, reg: Registry) -> dict:
    """Error, NFR against the parent and the cross-compatibility matrix of every trained
    (registered) generation of the chain, in chain order, on the test split."""
    from workers.data import load_dataset

    names = [g.name for g in cfg.generations if reg.generation(g.name) is not None]
    ds = load_dataset(cfg.data)
    y = ds.test.y
    out = outputs(reg, names, ds.test.x, cfg)
    preds = {n: out[n][1].argmax(1) for n in names}
    rows = []
    for n in names:
        parent = reg.generation(n).parent  # the lineage the registry recorded
        p = parent if parent in preds else None
        rows.append({"name": n, "status": reg.generation(n).status, "parent": p,
                     "error": M.error_rate(y, preds[n]),
                     "nfr": M.nfr(y, preds[p], preds[n]) if p else None})
    half = len(y) // 2
    _, matrix = M.compatibility_matrix({n: out[n][0][:half] for n in names}, y[:half],
                                       {n: out[n][0][half:] for n in names}, y[half:])
    return {"names": names, "rows": rows, "compat": matrix.tolist()}


# --- plots --------------------------------------------------------------------------------

def plot_flip_matrix(flips: np.ndarray, path: Path, title: str) -> None:
    plt = _plt()
    k = flips.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.8 + 0.5 * k))
    im = ax.imshow(flips, cmap="Reds", vmin=0, vmax=max(1, int(flips.max())))
    for i in range(k):
        for j in range(k):
            if flips[i, j]:
                ax.text(j, i, str(int(flips[i, j])), ha="center", va="center",
                        color="white" if flips[i, j] > 0.6 * flips.max() else "black", fontsize=9)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("candidate's (wrong) prediction")
    ax.set_ylabel("baseline's (right) prediction = true class")
    ax.set_title(title)
    from matplotlib.ticker import MaxNLocator

    fig.colorbar(im, ax=ax, label="negative flips", ticks=MaxNLocator(integer=True))
    _save(fig, path)


def plot_class_nfr(per_class: list[float], limit: float, path: Path, title: str) -> None:
    plt = _plt()
    k = len(per_class)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * k + 2), 3.4))
    vals = np.asarray(per_class) * 100
    colors = ["#d62728" if v > limit * 100 + 1e-9 else "#1f77b4" for v in vals]
    bars = ax.bar(range(k), vals, color=colors)
    ax.axhline(limit * 100, color="black", ls="--", lw=1, label=f"max_class_nfr {limit * 100:.1f}%")
    for b, v in zip(bars, vals):
        if v > 0:
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(k))
    ax.set_xlabel("true class")
    ax.set_ylabel("negative flip rate (%)")
    ax.set_ylim(0, max(limit * 100, float(vals.max()) if k else 0) * 1.25 + 0.1)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)


def plot_error_vs_nfr(rows: list[dict], candidate: str, max_nfr: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    pts = [r for r in rows if r["nfr"] is not None]
    for r in pts:
        hl = r["name"] == candidate
        ax.scatter(r["nfr"] * 100, r["error"] * 100, s=90 if hl else 50,
                   color="#d62728" if r["status"] == "rejected" else "#2ca02c" if r["status"] == "production" else "#1f77b4",
                   edgecolor="black" if hl else "none", zorder=3)
        ax.annotate(f"{r['name']} ({r['status']})", (r["nfr"] * 100, r["error"] * 100),
                    textcoords="offset points", xytext=(6, 4), fontsize=9)
    for r in rows:
        if r["nfr"] is None:  # the first generation: no parent to flip against
            ax.axhline(r["error"] * 100, color="grey", ls=":", lw=1)
            ax.text(0, r["error"] * 100, f" {r['name']} error", va="bottom", fontsize=8, color="grey")
    ax.axvline(max_nfr * 100, color="black", ls="--", lw=1, label=f"max_nfr {max_nfr * 100:.1f}%")
    ax.set_xlabel("NFR against its parent (%)")
    ax.set_ylabel("test error (%)")
    ax.set_title("Chain: error vs negative flips (lower left is better)")
    right = max([r["nfr"] * 100 for r in pts] + [max_nfr * 100])
    ax.set_xlim(0, right * 1.3 + 0.5)  # room for the labels right of the points
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_compat(names: list[str], matrix: np.ndarray, path: Path) -> None:
    plt = _plt()
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * k, 1.2 + 0.8 * k))
    im = ax.imshow(np.where(np.isnan(matrix), 0, matrix) * 100, cmap="viridis", vmin=0, vmax=100)
    for i in range(k):
        for j in range(k):
            v = matrix[i, j]
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v * 100:.1f}", ha="center", va="center",
                    color="white" if np.isnan(v) or v < 0.6 else "black", fontsize=10)
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("gallery generation")
    ax.set_ylabel("query generation")
    ax.set_title("Cross-compatibility: retrieval top-1 (%)")
    fig.colorbar(im, ax=ax, label="top-1 (%)")
    _save(fig, path)


def plot_chain_compat(names: list[str], matrix: np.ndarray, gallery: str, path: Path) -> None:
    """Own top-1 M(gk, gk) and compatibility with the served gallery M(gk, gallery) against
    the generation: where the line of the second falls below the dashed M(gallery, gallery),
    a gallery never re-indexed serves that generation's queries worse than its own model."""
    plt = _plt()
    k = names.index(gallery)
    xs = range(len(names))
    own = [matrix[i, i] * 100 for i in xs]
    vs = [matrix[i, k] * 100 for i in xs]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(names) + 2), 3.6))
    ax.plot(xs, own, "o-", label="own gallery M(gk, gk)")
    ax.plot(xs, vs, "s-", label=f"served gallery M(gk, {gallery})")
    ax.axhline(matrix[k, k] * 100, color="grey", ls="--", lw=1, label=f"M({gallery}, {gallery})")
    ax.set_xticks(list(xs), names)
    ax.set_xlabel("generation")
    ax.set_ylabel("retrieval top-1 (%)")
    ax.set_title(f"Compatibility along the chain (gallery built by {gallery})")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


# --- the report ---------------------------------------------------------------------------

def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v * 100:.2f}%"


def write_report(cfg: RunConfig, ev: Evaluation, reg: Registry, out_dir: Optional[Path] = None) -> Path:
    """Write `<out_dir or run_dir/reports>/<candidate>.md` and its PNGs; return the .md path."""
    out = Path(out_dir) if out_dir is not None else reports_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    c, b = ev.candidate, ev.baseline
    files = {k: f"{c}-{k}.png" for k in ("flips", "class-nfr", "chain", "compat", "chain-compat")}
    flips = np.asarray(ev.flip_matrix)
    plot_flip_matrix(flips, out / files["flips"], f"Negative flips {b} -> {c} ({int(flips.sum())} samples)")
    plot_class_nfr(ev.per_class_nfr, cfg.gates.max_class_nfr, out / files["class-nfr"],
                   f"Per-class NFR of {c} against {b}")
    chain = chain_summary(cfg, reg)
    plot_error_vs_nfr(chain["rows"], c, cfg.gates.max_nfr, out / files["chain"])
    compat = np.asarray(chain["compat"], dtype=float)
    plot_compat(chain["names"], compat, out / files["compat"])
    gallery = cfg.gallery if cfg.gallery in chain["names"] else chain["names"][0]
    plot_chain_compat(chain["names"], compat, gallery, out / files["chain-compat"])

    m = ev.metrics
    lineage = " -> ".join(g.name for g in reg.lineage(c))
    gen = reg.generation(c)
    lines = [
        f"# {c}: offline gate against {b} -- {ev.verdict.upper()}",
        "",
        f"Evaluated {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} on {m['n']} held-out samples "
        f"(evaluation {ev.evaluation_id}); status now **{ev.status}**. Lineage: {lineage}. "
        f"Checkpoint sha256 `{gen.sha256[:16]}...` (verified before use).",
        "",
        f"Each check is decided by exact one-sided confidence bounds, each at the level in its "
        f"row (gates.alpha {cfg.gates.alpha:g} split over the checks): pass when the bound on "
        f"the limit's side is within the limit, fail when the other bound is beyond it, "
        f"inconclusive when they straddle it (docs/evaluation.md, 'Offline gate').",
        "",
        "| gate key | value | lower bound | upper bound | limit | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for ch in ev.checks:
        val, lo, hi, lim = ("n/a" if v is None else f"{v:.4f}" for v in (ch.value, ch.lower, ch.upper, ch.limit))
        tag = {"pass": "pass", "fail": "**FAIL**"}.get(ch.verdict, "*inconclusive*")
        lines.append(f"| `{ch.key}` | {val} | {lo} | {hi} | {lim} | {tag}: {ch.reason} |")
    if ev.verdict == "inconclusive":
        lines += ["", f"Inconclusive: {INCONCLUSIVE_HINT}."]
    lines += [
        "",
        "| metric | value |",
        "|---|---|",
        f"| error {b} -> {c} | {_pct(m['error_baseline'])} -> {_pct(m['error_candidate'])} "
        f"({m['error_change'] * 100:+.2f} points) |",
        f"| NFR (negative flips: {b} right, {c} wrong) | {_pct(m['nfr'])} "
        f"(bootstrap 95% interval {_pct(m['nfr_ci_low'])} - {_pct(m['nfr_ci_high'])}; the gate uses the bounds above) |",
        f"| NFI (NFR / candidate error) | {m['nfi']:.3f} |",
        f"| PFR (positive flips) | {_pct(m['pfr'])} |",
        f"| disagreement | {_pct(m['disagreement'])} |",
        f"| worst per-class NFR | class {m['worst_class']}: {_pct(m['worst_class_nfr'])} |",
        f"| M({c}, {b}) vs M({b}, {b}) | {_pct(m['m_candidate_production'])} vs "
        f"{_pct(m['m_production_production'])} |",
        *[f"| M({q}, {het['gallery']}): query generation in the gallery model's gallery (not gated) | {_pct(v)} "
          f"(M({het['gallery']}, {het['gallery']}) {_pct(het['gallery_top1'])}) |"
          for het in [m.get("query_generations") or {"top1": {}}] for q, v in het["top1"].items()],
        "",
        "## Where the negative flips go",
        "",
        f"![flip matrix]({files['flips']})",
        "",
        f"![per-class NFR]({files['class-nfr']})",
        "",
        "## The chain",
        "",
        "Each generation's error, and its NFR against its parent (the model it was trained to replace).",
        "",
        f"![error vs NFR]({files['chain']})",
        "",
        "| generation | status | parent | error | NFR vs parent |",
        "|---|---|---|---|---|",
    ]
    for r in chain["rows"]:
        lines.append(f"| {r['name']} | {r['status']} | {r['parent'] or '-'} | {_pct(r['error'])} | {_pct(r['nfr'])} |")
    lines += [
        "",
        "Cross-compatibility: top-1 of each generation's query embeddings searched (faiss, cosine) "
        "against each generation's gallery; the diagonal is each model on its own, off-diagonal "
        "cells are what serving an old gallery without backfill gives.",
        "",
        f"![cross-compatibility]({files['compat']})",
        "",
        f"Compatibility along the chain: each generation's own top-1 and its top-1 in the gallery "
        f"that {gallery}'s embeddings fill (served, never re-indexed). The price the constraints "
        f"cost each generation (the compatibility tax, against independently trained models) is "
        f"measured by `benchmarks/chain_tax.py` (docs/training.md, 'compatibility tax').",
        "",
        f"![compatibility along the chain]({files['chain-compat']})",
        "",
        f"Regenerate: `graceful evaluate CONFIG --candidate {c}" + (f" --against {b}`" if b else "`"),
        "",
    ]
    path = out / f"{c}.md"
    path.write_text("\n".join(lines))
    return path
