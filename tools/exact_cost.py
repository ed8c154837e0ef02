"""What the row-invariant numerics cost: one target forward (logits included) of 1 row and of 16 tree
rows after a --past-token prefix, exact=True vs exact=False, interleaved in one process.

Prints, per row count, the minimum and median ms of each setting over --reps alternating passes and
the ratio exact / ATen kernels. Usage: python tools/exact_cost.py [--reps 30] [--past 200] [--dtype bfloat16]
"""

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

import eagle2
from eagle2.config import Backend
from eagle2.fast import FastTarget


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--past", type=int, default=200)
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on a busy machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model = eagle2.load("smollm2-135m", dtype=getattr(torch, args.dtype)).model
    targets = {"exact": FastTarget(model, backend=Backend(exact=True)),
               "aten": FastTarget(model, backend=Backend(exact=False))}
    g = torch.Generator().manual_seed(0)
    n = args.past
    prompt = torch.randint(0, model.config.vocab_size, (n,), generator=g)
    caches = {}
    for name, tgt in targets.items():
        caches[name] = tgt.new_cache(capacity=n + 64)
        tgt.forward(caches[name], prompt, torch.arange(n), None)
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "dtype": args.dtype, "past": n,
           "threads": torch.get_num_threads()}
    for m in [int(r) for r in args.rows.split(",")]:
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, m)]
        tree, depth = torch.eye(m, dtype=torch.bool), torch.zeros(m, dtype=torch.long)
        for i in range(1, m):
            tree[i] |= tree[parents[i]]
            depth[i] = depth[parents[i]] + 1
        allowed = torch.cat([torch.ones(m, n, dtype=torch.bool), tree], dim=1)
        tokens = torch.randint(0, model.config.vocab_size, (m,), generator=g)
        times = {name: [] for name in targets}
        for rep in range(args.reps + 3):
            for name, tgt in targets.items():
                c = caches[name]
                t0 = time.perf_counter()
                tgt.forward(c, tokens, n + depth, allowed)
                dt = time.perf_counter() - t0
                c.length = n
                if rep >= 3:  # warm-up passes
                    times[name].append(dt * 1e3)
        row = {name: {"min_ms": round(min(v), 3), "median_ms": round(statistics.median(v), 3)} for name, v in times.items()}
        row["ratio_min"] = round(row["exact"]["min_ms"] / row["aten"]["min_ms"], 3)
        row["ratio_median"] = round(row["exact"]["median_ms"] / row["aten"]["median_ms"], 3)
        out[f"rows_{m}"] = row
        print(m, json.dumps(row), flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
