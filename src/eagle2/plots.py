"""PNG plots for ``eagle2 bench`` and ``eagle2 tune`` (matplotlib, Agg backend, imported lazily).

Every function takes plain Python data (what results.json / the tune file hold) and a path,
and returns the path written, or None when matplotlib is missing or there is nothing to plot.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("eagle2")


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'eagle2[bench]')")
        return None
    return plt


def _save(fig, plt, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speedup_per_category(per_category: dict, methods: list[str], baseline: str, path) -> Path | None:
    """Grouped bars: speedup of each method over ``baseline`` per category (+ 'all')."""
    plt = _plt()
    key = f"speedup_vs_{baseline}"
    cats = list(per_category)
    shown = [m for m in methods if m != baseline]
    if plt is None or not cats or not shown:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cats) * max(1, len(shown)) / 2 + 2), 4))
    width = 0.8 / len(shown)
    for j, m in enumerate(shown):
        vals = [(per_category[c].get(m) or {}).get(key) or 0.0 for c in cats]
        ax.bar([i + (j - (len(shown) - 1) / 2) * width for i in range(len(cats))], vals, width, label=m)
    ax.axhline(1.0, color="gray", lw=1, ls="--")
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=30, ha="right")
    ax.set_ylabel(f"speedup vs {baseline}")
    ax.set_title(f"tokens/s relative to {baseline}, per category")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def accept_histogram(histograms: dict, path) -> Path | None:
    """Drafted tokens accepted per round, one series per speculative method (``histograms``:
    method -> {accepted count (as a string, the JSON key): rounds}), as fractions of rounds."""
    plt = _plt()
    data = {m: {int(k): n for k, n in h.items()} for m, h in histograms.items() if h}
    if plt is None or not data:
        return None
    top = max(max(h) for h in data.values())
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(data)
    for j, (m, h) in enumerate(data.items()):
        total = sum(h.values())
        mean = sum(k * n for k, n in h.items()) / total
        xs = [x + (j - (len(data) - 1) / 2) * width for x in range(top + 1)]
        ax.bar(xs, [h.get(x, 0) / total for x in range(top + 1)], width, alpha=0.8, label=f"{m} (mean {mean:.2f})")
    ax.set_xticks(range(top + 1))
    ax.set_xlabel("drafted tokens accepted per round")
    ax.set_ylabel("fraction of rounds")
    ax.set_title("acceptance length")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def calibration(bins: dict, path) -> Path | None:
    """Draft confidence bin vs observed acceptance rate (``bins``: method -> list of bin dicts)."""
    plt = _plt()
    data = {m: b for m, b in bins.items() if any(x["n"] for x in b)}
    if plt is None or not data:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="gray", lw=1, ls="--", label="perfect calibration")
    for m, b in data.items():
        pts = [x for x in b if x["n"]]
        ax.plot([x["mean_confidence"] for x in pts], [x["accept_rate"] for x in pts], "o-", label=m)
        for x in pts:  # how many drafts each point averages
            ax.annotate(str(x["n"]), (x["mean_confidence"], x["accept_rate"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("draft probability of a depth-1 node (bin mean)")
    ax.set_ylabel("fraction accepted by the target")
    ax.set_title("draft calibration")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def tokens_per_s_vs_total_tokens(points: list[dict], path, title: str = "tokens/s vs tree size",
                                 baseline: float | None = None) -> Path | None:
    """Lines of tokens/s against total_tokens, one per (depth, tree_top_k)."""
    plt = _plt()
    if plt is None or not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict = {}
    for p in points:
        series.setdefault((p.get("depth"), p.get("tree_top_k")), []).append(p)
    for (d, k), ps in sorted(series.items(), key=lambda kv: str(kv[0])):
        ps = sorted(ps, key=lambda p: p["total_tokens"])
        ax.plot([p["total_tokens"] for p in ps], [p["tokens_per_s"] for p in ps], "o-", label=f"depth {d}, top-k {k}")
    if baseline:
        ax.axhline(baseline, color="gray", lw=1, ls="--", label="vanilla")
    ax.set_xlabel("total_tokens (tree nodes verified per round)")
    ax.set_ylabel("tokens/s")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def forward_curve(curve: list[dict], path) -> Path | None:
    """Target forward time (ms) against query length."""
    plt = _plt()
    if plt is None or not curve:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["query_len"] for c in curve], [c["ms"] for c in curve], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("query tokens in one target forward")
    ax.set_ylabel("ms per forward (median)")
    ax.set_title("target forward time vs query length")
    ax.set_ylim(bottom=0)
    return _save(fig, plt, path)
