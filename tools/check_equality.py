"""Greedy-equality and speed check on MT-bench first turns: every method's tokens against transformers', and their speed.

For each question: transformers greedy `generate` (fp32), then eagle2 and vanilla in our engine,
interleaved; counts prompts whose eagle2 tokens equal transformers' and reports tokens/s.
Usage: python tools/check_equality.py [--limit 24] [--max-new-tokens 128] [--dtype float32]
"""

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

import eagle2
from eagle2.machine import data_dir



def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--head", default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    gen = eagle2.load("smollm2-135m", head=args.head, dtype=args.dtype)
    qs = [json.loads(l) for l in (data_dir() / "eval" / "mt_bench_question.jsonl").read_text().splitlines()]
    qs = qs[:: max(1, len(qs) // args.limit)][: args.limit]
    same, rows = 0, []
    eos = sorted(gen.eos_ids)
    gen.generate("warm up", max_new_tokens=8)
    for q in qs:
        ids = gen.encode_prompt([{"role": "user", "content": q["turns"][0]}])
        t = time.perf_counter()
        x = torch.tensor([ids])
        ref = gen.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos[0])[0, len(ids):].tolist()
        hf_tps = len(ref) / (time.perf_counter() - t)
        e = gen.generate(ids, max_new_tokens=args.max_new_tokens, method="eagle2")
        v = gen.generate(ids, max_new_tokens=args.max_new_tokens, method="vanilla")
        ok = e.token_ids == ref
        same += ok
        rows.append(dict(id=q["question_id"], category=q["category"], identical=ok, vanilla_identical=v.token_ids == ref,
                         hf_tps=hf_tps, eagle2_tps=e.stats.tokens_per_s, vanilla_tps=v.stats.tokens_per_s,
                         tau=e.stats.mean_accept_len, n=len(ref)))
        print(json.dumps(rows[-1]), flush=True)
    med = lambda k: round(statistics.median(r[k] for r in rows), 2)
    print(json.dumps(dict(prompts=len(rows), eagle2_identical=same,
                          vanilla_identical=sum(r["vanilla_identical"] for r in rows),
                          median_hf_tps=med("hf_tps"), median_vanilla_tps=med("vanilla_tps"),
                          median_eagle2_tps=med("eagle2_tps"), median_tau=med("tau"), dtype=args.dtype)))
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
