"""Render one markdown table from several ``eagle2 bench`` results.json files (one row per method and run).

    python tools/results_table.py docs/results/2026-12-02-epyc-zen4/*/results.json

Prints: run, method, tokens/s, speedup vs vanilla, tau, draft and verify ms per round, mean nodes
and depth verified per round (tree methods), greedy-identical fraction (T = 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(path: Path) -> list[str]:
    r = json.loads(path.read_text())
    run = f"{path.parent.name} (T={r['temperature']:g}, {r['n_prompts']} prompts)"
    out = []
    for name, s in r["methods"].items():
        prof = s.get("round_profile_ms") or {}
        tree = s.get("tree_per_round") or {}
        gi = (r.get("greedy_identical") or {}).get(name)
        cells = [run, name, f"{s['tokens_per_s']:.1f}", _f(s.get("speedup_vs_vanilla")), _f(s.get("mean_accept_len")),
                 _f(prof.get("draft"), "{:.1f}"), _f(prof.get("verify"), "{:.1f}"), _f(tree.get("size_mean"), "{:.1f}"),
                 _f(tree.get("depth_mean"), "{:.1f}"), _f(gi)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _f(x, fmt="{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit("usage: results_table.py RESULTS.json ...")
    print("| run | method | tokens/s | vs vanilla | tau | draft ms | verify ms | nodes | depth | greedy = vanilla |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in paths:
        print("\n".join(rows(Path(p))))


if __name__ == "__main__":
    main(sys.argv[1:])
