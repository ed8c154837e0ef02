"""Where one EAGLE-2 round spends its time, lever by lever: what each fast path buys, measured before and after it.

Configurations, run interleaved over the same MT-bench first turns (greedy, same dtype):

    before      transformers backend (general path), draft over the full vocabulary, plain F.linear
    +lean       our lean forward (static KV cache, fused projections, small-query attention)
    +frspec     lean forward + the head's FR-Spec draft vocabulary
    +packed     + bf16 weights prepacked for oneDNN in target and draft (kernels.py)
    +native     + the decoder stacks of target and draft run from C++ (native.py)
    +q4         + the target's low-bit block weights (4-bit layers, 8-bit lm_head) on AMX (kernels.py; the default)

plus plain `vanilla` decoding on each backend. Per configuration it prints the median over
prompts of tokens/s and, summed over all rounds, milliseconds per round in draft (commit of the
accepted pairs + tree growth + rerank), verify (target forward over the tree, acceptance, KV
compaction) and other (stop/EOS checks, detokenizing, Python around the loop).

Usage: python tools/profile_round.py [--limit 8] [--max-new-tokens 128] [--dtype bfloat16] [--json out.json]
                                     [--only native]  (configurations whose name contains any of these words)
                                     [--total-tokens 8 --depth 4 --tree-top-k 4]  (the tree; default: the tuned one)
"""

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import eagle2
from eagle2.config import Backend
from eagle2.eagle3_head import Eagle3Head
from eagle2.machine import data_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--head", default=None)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    ap.add_argument("--only", default="", help="comma-separated words: run only configurations whose name has one")
    ap.add_argument("--total-tokens", type=int, default=None, help="tree size (default: the tuned tree, else 16)")
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--tree-top-k", type=int, default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    configs = {  # name -> (generator, method, draft_vocab: None = head's list, 0 = full vocabulary)
        "vanilla (transformers)": ("transformers", "vanilla", 0),
        "vanilla (lean)": ("fast", "vanilla", 0),
        "vanilla (lean + packed linears)": ("fast+packed", "vanilla", 0),
        "vanilla (lean + native, unpacked)": ("fast+native", "vanilla", 0),
        "vanilla (lean + packed + native)": ("fast+packed+native", "vanilla", 0),
        "eagle2 before (transformers, full vocab)": ("transformers", "eagle2", 0),
        "eagle2 +lean forward": ("fast", "eagle2", 0),
        "eagle2 +lean +FR-Spec": ("fast", "eagle2", None),
        "eagle2 +lean +FR-Spec +packed": ("fast+packed", "eagle2", None),
        "vanilla (lean + packed + native + q4)": ("fast+packed+native+q4", "vanilla", 0),
        "eagle2 +lean +FR-Spec +native, unpacked": ("fast+native", "eagle2", None),
        "eagle2 +lean +FR-Spec +packed +native": ("fast+packed+native", "eagle2", None),
        "eagle2 +lean +FR-Spec +packed +native +q4 (default)": ("fast+packed+native+q4", "eagle2", None),
    }
    words = [w for w in args.only.split(",") if w]
    if words:
        configs = {k: v for k, v in configs.items() if any(w in k for w in words)}
    gens = {}
    for name, backend, packed, use_native, q4 in (("transformers", "transformers", False, False, False),
                                                  ("fast", "fast", False, False, False),
                                                  ("fast+packed", "fast", True, False, False),
                                                  ("fast+native", "fast", False, True, False),
                                                  ("fast+packed+native", "fast", True, True, False),
                                                  ("fast+packed+native+q4", "fast", True, True, True)):
        if any(v[0] == name for v in configs.values()):
            switches = Backend(forward=backend, native=use_native, packed_linear=packed, lowbit=q4)
            gens[name] = eagle2.load(args.model, head=args.head, dtype=args.dtype, backend=switches)
    qs = [json.loads(l) for l in (data_dir() / "eval" / "mt_bench_question.jsonl").read_text().splitlines()]
    qs = qs[:: max(1, len(qs) // args.limit)][: args.limit]
    for g in gens.values():
        g.generate("warm up", max_new_tokens=16)
    rows = {name: dict(tps=[], rounds=0, forwards=0, new=0, draft=0.0, verify=0.0, other=0.0, decode=0.0) for name in configs}
    for qi, q in enumerate(qs):
        msgs = [{"role": "user", "content": q["turns"][0]}]
        for name, (backend, method, dv) in configs.items():
            g = gens[backend]
            if not isinstance(g.head, Eagle3Head):  # an EAGLE-3 head's draft vocabulary is part of the head
                g.drafter.set_draft_vocab(dv)
            s = g.generate(msgs, max_new_tokens=args.max_new_tokens, method=method, total_tokens=args.total_tokens,
                           depth=args.depth, tree_top_k=args.tree_top_k).stats
            r = rows[name]
            r["tps"].append(s.tokens_per_s)
            r["rounds"] += s.rounds - 1  # decode rounds (the prefill forward is not one)
            r["forwards"] += s.rounds
            r["new"] += s.new_tokens
            r["draft"] += s.draft_seconds
            r["verify"] += s.verify_seconds
            r["decode"] += s.seconds - s.prefill_seconds
            r["other"] += s.seconds - s.prefill_seconds - s.draft_seconds - s.verify_seconds
        print(f"prompt {qi + 1}/{len(qs)} done", file=sys.stderr)
    table = []
    print(f"{'configuration':50s} {'tok/s':>7s} {'tau':>5s} {'ms/round':>8s} {'draft':>6s} {'verify':>6s} {'other':>6s}")
    for name, r in rows.items():
        n = max(1, r["rounds"])
        row = dict(config=name, tokens_per_s=statistics.median(r["tps"]), tau=r["new"] / max(1, r["forwards"]),  # mean accept length as the engine defines it
                   ms_per_round=1e3 * r["decode"] / n, draft_ms=1e3 * r["draft"] / n,
                   verify_ms=1e3 * r["verify"] / n, other_ms=1e3 * r["other"] / n)
        table.append(row)
        print(f"{name:50s} {row['tokens_per_s']:7.1f} {row['tau']:5.2f} {row['ms_per_round']:8.1f} "
              f"{row['draft_ms']:6.1f} {row['verify_ms']:6.1f} {row['other_ms']:6.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=table), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
