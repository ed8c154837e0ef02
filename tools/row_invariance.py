"""Which ops of the lean forward give a row a result that depends on how many rows share the call.

A decode step runs the target over 1 row; a tree verification over 2..48 rows, the root first, its
mask row seeing the prefix and itself only. For greedy speculative decoding to equal vanilla
decoding bit for bit, the root's row of the verification must equal the 1-row step. This script
prefills a prompt, then for M in --rows runs (a) the root alone and (b) root + M - 1 random tree
nodes over copies of the same cache, and compares row 0:

- end to end, on the native stack and on the Python loop (hidden states and logits);
- op by op, on an instrumented copy of the Python loop where every op of the M-row call gets the
  1-row call's input in row 0 (so a difference is that op's own, not one inherited from upstream).

Usage: python tools/row_invariance.py [--model smollm2-135m | --tiny] [--dtype bfloat16] [--rows 2,4,8,16,32,48]
"""

import argparse
import copy
import sys
import warnings

import torch
import torch.nn.functional as F

from eagle2.config import Backend
from eagle2.draft_head import ACTIVATIONS
from eagle2.fast import FastTarget, _rms, _rotate, additive_mask, exact_attention


def tree_mask(m: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random tree of m nodes rooted at node 0: (ancestor-or-self mask [m, m], depths [m])."""
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, m)]
    mask = torch.eye(m, dtype=torch.bool)
    depth = [0] * m
    for i in range(1, m):
        depth[i] = depth[parents[i]] + 1
        mask[i] = mask[parents[i]]
        mask[i, i] = True
    return mask, torch.tensor(depth)


def tables(tgt: FastTarget, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] rows of the target's rotary tables at ``positions``."""
    return tgt.rope.rows(positions)


def op_by_op(tgt: FastTarget, cache, past: int, tokens: torch.Tensor, positions: torch.Tensor,
             allowed: torch.Tensor, ref: dict | None) -> dict:
    """The Python loop of fast.Stack with every intermediate recorded (name -> [T, ...] tensor).
    With ``ref`` (the 1-row call's record), each op's input row 0 is replaced by the 1-row input,
    so that each op is compared on equal inputs."""
    st, dm = tgt.stack, tgt.stack.dims
    rec: dict = {}

    def pin(name, x):  # x [B, T, ...]: row 0 of this op's input := the 1-row run's
        if ref is not None:
            x = x.clone()
            x[:, 0] = ref[name][:, 0]
        rec[name] = x
        return x

    b, t = 1, tokens.shape[0]
    s = past + t
    hq, hk, d = dm.n_heads, dm.kv_heads, dm.head_dim
    act = ACTIVATIONS[dm.act]
    ex = st.exact
    cos, sin = (r[None, None] for r in tgt.rope.rows(positions))
    bias = additive_mask(allowed[None], tgt.dtype)
    x = tgt.embed(tokens[None])
    for i, L in enumerate(st.layers):
        x = pin(f"{i}.rms1.in", x)
        h = _rms(L.n1, x, dm.eps)
        h = pin(f"{i}.qkv.in", h)
        qkv = L.qkv(h, ex)
        rec[f"{i}.qkv.out"] = qkv
        qkv = pin(f"{i}.rope.in", qkv)
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        q = _rotate(q.view(b, t, hq, d).transpose(1, 2), cos, sin)
        k = _rotate(k.view(b, t, hk, d).transpose(1, 2), cos, sin)
        rec[f"{i}.rope.q"] = q.transpose(1, 2)
        cache.k[i, :, :, past:s] = k
        cache.v[i, :, :, past:s] = v.view(b, t, hk, d).transpose(1, 2)
        keys, vals = cache.k[i, :, :, :s], cache.v[i, :, :, :s]
        q = pin(f"{i}.sdpa.in", q.transpose(1, 2)).transpose(1, 2)
        if ex:
            o = exact_attention(q, cache.k[i], cache.v[i], bias, s, dm.scale)
        else:
            o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=bias, scale=dm.scale, enable_gqa=hq > hk)
        o = o.transpose(1, 2).reshape(b, t, hq * d)
        rec[f"{i}.sdpa.out"] = o
        o = pin(f"{i}.o.in", o)
        y = L.o(o, ex)
        rec[f"{i}.o.out"] = y
        x = x + y
        x = pin(f"{i}.rms2.in", x)
        h = _rms(L.n2, x, dm.eps)
        rec[f"{i}.rms2.out"] = h
        h = pin(f"{i}.gu.in", h)
        gu = L.gu(h, ex)
        rec[f"{i}.gu.out"] = gu
        gu = pin(f"{i}.act.in", gu)
        gate, up = gu.split(dm.inter, dim=-1)
        a = act(gate) * up
        rec[f"{i}.act.out"] = a
        a = pin(f"{i}.down.in", a)
        y = L.down(a, ex)
        rec[f"{i}.down.out"] = y
        x = x + y
    x = pin("final.in", x)
    h = _rms(st.final_norm, x, dm.eps)
    rec["final.out"] = h
    h = pin("lm_head.in", h)
    rec["lm_head.out"] = tgt._lm(h)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (tests/conftest.py)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", default="2,3,4,8,16,32,48")
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exact", choices=("on", "off", "default"), default="default", help="row-invariant numerics")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    dtype = getattr(torch, args.dtype)
    args.exact = {"on": True, "off": False, "default": None}[args.exact]
    if args.tiny:
        sys.path.insert(0, "tests")
        from conftest import make_tiny_model

        tgt = FastTarget(make_tiny_model("llama", vocab_size=64, seed=1).to(dtype), backend=Backend(exact=args.exact))
    else:
        import eagle2

        tgt = eagle2.load(args.model, dtype=dtype, exact=args.exact).target
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, {dtype}, "
          f"native {tgt.stack.is_native}, packed {tgt.stack.packed}, exact {tgt.exact}")
    g = torch.Generator().manual_seed(args.seed)
    vocab = tgt.vocab_size
    n = args.prompt_len
    base = tgt.new_cache(capacity=n + 64)
    with torch.inference_mode():
        tgt.forward(base, torch.randint(0, vocab, (n,), generator=g), torch.arange(n), None)
    root = torch.randint(0, vocab, (1,), generator=g)
    total_bad = 0
    with torch.inference_mode():
        one = {}
        for python in (False, True):
            c = copy.deepcopy(base)
            h = tgt.stack(tgt.embed(root[None]), *[t[None, None] for t in tables(tgt, torch.tensor([n]))],
                          additive_mask(torch.ones(1, 1, n + 1, dtype=torch.bool), tgt.dtype), c, n, python=python)
            one[python] = (h[0, 0], tgt.logits(h[0, :1])[0])
        ref = op_by_op(tgt, copy.deepcopy(base), n, root, torch.tensor([n]), torch.ones(1, n + 1, dtype=torch.bool), None)
        for m in [int(r) for r in args.rows.split(",")]:
            mask, depth = tree_mask(m, g)
            tokens = torch.cat([root, torch.randint(0, vocab, (m - 1,), generator=g)])
            allowed = torch.cat([torch.ones(m, n, dtype=torch.bool), mask], dim=1)
            line = [f"M={m:2d}"]
            for python in (False, True):
                c = copy.deepcopy(base)
                cos, sin = tables(tgt, n + depth)
                h = tgt.stack(tgt.embed(tokens[None]), cos[None, None], sin[None, None],
                              additive_mask(allowed[None], tgt.dtype), c, n, python=python)
                lg = tgt.logits(h[0, :1])[0]
                same_h, same_l = torch.equal(h[0, 0], one[python][0]), torch.equal(lg, one[python][1])
                total_bad += not (same_h and same_l)
                diff = float((lg - one[python][1]).abs().max())
                line.append(f"{'python' if python else 'native'}: hidden {'==' if same_h else '!='} "
                            f"logits {'==' if same_l else '!='} (max |dlogit| {diff:.3g})")
            rec = op_by_op(tgt, copy.deepcopy(base), n, tokens, n + depth, allowed, ref)
            bad_ops = sorted({k.split(".", 1)[-1] for k in rec if k.endswith(("out", ".q")) and
                              not torch.equal(rec[k][:, 0], ref[k][:, 0])})
            line.append(f"ops differing: {', '.join(bad_ops) or 'none'}")
            print("  ".join(line), flush=True)
    print("row invariant" if total_bad == 0 else f"NOT row invariant ({total_bad} mismatches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
