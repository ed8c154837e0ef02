"""Greedy speculative output vs our own vanilla output, with the row-invariant numerics on and off.

For each of the first --limit MT-bench first turns: vanilla and each --methods decode in the engine
(greedy, --dtype), run interleaved with exact=True and exact=False on one loaded model; counts the
prompts whose output equals vanilla's of the same setting, and reports median tokens/s.
Usage: python tools/exact_check.py [--limit 20] [--max-new-tokens 64] [--dtype bfloat16] [--methods eagle2,eagle1,chain]
"""

import argparse
import json
import statistics
import sys
import warnings

import torch

import eagle2
from eagle2.api import Eagle2Generator
from eagle2.machine import data_dir



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--methods", default="eagle2")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    on = eagle2.load("smollm2-135m", dtype=getattr(torch, args.dtype), exact=True)
    off = Eagle2Generator(on.model, on.tokenizer, on.head, model_key=on.model_key, tree=on.tree,
                          head_source=on.head_source, exact=False)
    gens = {"exact": on, "default-off": off}
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.dtype}, "
          f"exact targets: {on.target.exact}/{off.target.exact}", flush=True)
    methods = args.methods.split(",")
    lines = (data_dir() / "eval" / "mt_bench_question.jsonl").read_text().splitlines()
    qs = [json.loads(line) for line in lines][: args.limit]
    for g in gens.values():
        g.generate("warm up", max_new_tokens=8)
        g.cost_model()
    same = {(name, m): 0 for name in gens for m in methods}
    tps = {(name, m): [] for name in gens for m in ["vanilla"] + methods}
    for q in qs:
        ids = on.encode_prompt([{"role": "user", "content": q["turns"][0]}])
        row = {"id": q["question_id"]}
        for name, g in gens.items():
            v = g.generate(ids, max_new_tokens=args.max_new_tokens, method="vanilla")
            tps[(name, "vanilla")].append(v.stats.tokens_per_s)
            for m in methods:
                r = g.generate(ids, max_new_tokens=args.max_new_tokens, method=m)
                ok = r.token_ids == v.token_ids
                same[(name, m)] += ok
                tps[(name, m)].append(r.stats.tokens_per_s)
                row[f"{name}:{m}"] = ok
        print(json.dumps(row), flush=True)
    summary = {f"{n}:{m}_identical_to_vanilla": f"{c}/{len(qs)}" for (n, m), c in same.items()}
    summary.update({f"{n}:{m}_median_tps": round(statistics.median(v), 2) for (n, m), v in tps.items()})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
