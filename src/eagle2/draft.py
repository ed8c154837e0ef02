"""The drafter: grows one draft tree per round with the draft head.

Owns the head's static KV cache (fast.StaticCache, one layer) and runs the head's layer on
fast.Stack — natively on a CPU — in the target's dtype. Its committed length counts only *true*
pairs — the target's feature f_i with the next accepted token t_{i+1}, at position i — so
nothing has to be rolled back: a ``grow`` writes tree entries after them, and the next
``commit`` overwrites those.

Round protocol (the engine calls, in order):
1. ``commit(features, tokens)``: append the pairs the last verification produced; returns the
   head's output at the last pair, the predicted feature after the root.
2. ``grow(root, root_out, config, max_depth)``: expand the tree (EAGLE-2 dynamic, EAGLE-1 static or
   a chain) and return a ``Tree`` (tree.py). A node at depth d is fed to the head at position
   (position of the root's pair) + d with the feature its parent produced.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from .config import TreeConfig
from .draft_head import DraftHead
from .fast import Dims, Layer, Stack, StaticCache, additive_mask
from .kernels import Linear, linear
from .target import Target
from .tree import Tree, build_tree, expand, rerank, select_frontier, static_tree_parents, static_tree_paths


@lru_cache(maxsize=64)
def _static_layout(method: str, total_tokens: int, depth: int, top_k: int):
    """(paths, parents, depths, ranks) of a static tree; node 0 is the root."""
    if method == "chain":
        paths = [(0,) * d for d in range(1, min(depth, total_tokens - 1) + 1)]
    else:
        paths = static_tree_paths(total_tokens, depth, top_k)
    parents = [-1] + static_tree_parents(paths)
    depths = [0] + [len(p) for p in paths]
    ranks = [0] + [p[-1] for p in paths]
    return tuple(paths), tuple(parents), tuple(depths), tuple(ranks)


class Drafter:
    def __init__(self, head: DraftHead, target: Target, draft_vocab: int | None = None, capacity: int = 1024):
        """draft_vocab: propose only the first N tokens of the head's draft vocabulary (None:
        all of it; 0: the full vocabulary). Heads without one draft over the full vocabulary."""
        self.target = target
        self.head = head
        self.stack, self.fc = _lean_head(head, target)  # the head's layer on fast.Stack, in the target's dtype
        self.cache = StaticCache(1, 1, head.config.num_key_value_heads, head.config.head_dim, capacity,
                                 target.dtype, target.device)
        self._cos = self._sin = None  # [P, D] the head's rotary tables (its own theta, no scaling)
        self.vocab_ids: Tensor | None = None  # [N] token id of each draft logit column
        self.set_draft_vocab(draft_vocab)
        self.length = 0  # committed true pairs; tree entries sit after them for one ``grow``

    def set_draft_vocab(self, n: int | None) -> None:
        ids = self.head.draft_vocab
        if ids is None or n == 0:
            self.vocab_ids = self._lm = None
            return
        if n is not None:
            if n < 1:
                raise ValueError(f"draft_vocab must be >= 1 (or 0 for the full vocabulary); got {n}")
            ids = ids[:n]
        w = self.target.lm_head.weight
        self.vocab_ids = ids.to(w.device)
        b = getattr(self.target.lm_head, "bias", None)
        src = self.target.float_weight(w)  # fp32 rows for the low-bit kernel where the lm_head has them
        self._lm = linear(w[self.vocab_ids], None if b is None else b[self.vocab_ids],
                          None if src is None else src[self.vocab_ids.cpu()])  # the draft's own [N, H] lm_head

    def reset(self) -> None:
        self.length = 0

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [T] -> cos, sin [1, 1, T, D], rows of a table computed as ``DraftHead.rope`` does."""
        top = int(positions.max()) + 1
        if self._cos is None or self._cos.shape[0] < top:
            n = max(top, 2 * (0 if self._cos is None else self._cos.shape[0]), 1024)
            cos, sin = self.head.rope(torch.arange(n, device=self.head.inv_freq.device)[None], self.target.dtype)
            self._cos, self._sin = cos[0, 0].to(positions.device), sin[0, 0].to(positions.device)
        return self._cos[positions][None, None], self._sin[positions][None, None]

    def _run(self, feats: Tensor, tokens: Tensor, positions: Tensor, at: int, mask: Tensor) -> Tensor:
        """Feed T (feature, token) pairs, their keys/values written at cache index ``at``.. :
        feats [T, H], tokens [T], positions [T], mask [T, at + T] bool -> head outputs [T, H]."""
        cache = self.cache
        cache.length = at
        cache.reserve(tokens.shape[0])
        emb = self.target.embed(tokens[None])  # [1, T, H]
        x = self.fc(torch.cat([emb, feats[None].to(emb.dtype)], dim=-1))  # embedding first, as released
        cos, sin = self._rope(positions)
        out = self.stack(x, cos, sin, additive_mask(mask[None], x.dtype), cache, at)
        return out[0]

    @torch.inference_mode()
    def commit(self, features: Tensor, tokens: Tensor) -> Tensor:
        """Append true pairs (f_i, t_{i+1}): features [n, H], tokens [n]. Returns out [H] of the last."""
        n = tokens.shape[0]
        dev = tokens.device
        positions = torch.arange(self.length, self.length + n, device=dev)
        mask = torch.ones(n, self.length + n, dtype=torch.bool, device=dev).tril(self.length)  # causal
        out = self._run(features, tokens, positions, self.length, mask)
        self.length += n
        return out[-1]

    def _logp(self, out: Tensor) -> Tensor:
        """[.., H] head outputs -> [.., N] fp32 log-probs over the draft vocabulary (column j is
        token ``self._token(j)``)."""
        if self.vocab_ids is None:
            return torch.log_softmax(self.target.logits(out), dim=-1)  # [.., V]
        logits = self._lm(out).float()
        if self.target.softcap:
            logits = torch.tanh(logits / self.target.softcap) * self.target.softcap
        return torch.log_softmax(logits, dim=-1)

    def _token(self, cols: Tensor) -> Tensor:
        return cols if self.vocab_ids is None else self.vocab_ids[cols]

    @torch.inference_mode()
    def grow(self, root: Tensor, root_out: Tensor, cfg: TreeConfig, max_depth: int) -> Tree:
        depth = min(cfg.depth, max_depth)
        if cfg.method == "eagle2":
            return self._grow_dynamic(root, root_out, depth, cfg.top_k, cfg.total_tokens)
        return self._grow_static(root, root_out, *_static_layout(cfg.method, cfg.total_tokens, depth, cfg.top_k)[1:])

    def _grow_dynamic(self, root: Tensor, root_out: Tensor, depth: int, top_k: int, total_tokens: int) -> Tree:
        """EAGLE-2: expand the top_k frontier by value for ``depth`` levels, then rerank."""
        dev = root.device
        pos_root = self.length - 1  # the root's pair (f_{L-1}, root) sits at position L - 1
        k = min(top_k, self.target.vocab_size)
        k = min(k, self.vocab_ids.shape[0]) if self.vocab_ids is not None else k
        child_tok, child_lp, child_val = expand(torch.zeros(1, device=dev), self._logp(root_out)[None], k)
        child_tok = self._token(child_tok)
        cand_tok, cand_par, cand_val, cand_lp = [child_tok[0]], [torch.full((k,), -1, device=dev)], [child_val[0]], [child_lp[0]]
        n_cand = k
        frontier = torch.arange(k, device=dev)  # candidate indices of the nodes to feed next
        f_tok, f_val, f_feat = child_tok[0], child_val[0], root_out.expand(k, -1)
        f_parent_fed = torch.full((k,), -1, dtype=torch.long, device=dev)  # parent's index among fed nodes
        fed_anc = torch.zeros(0, 0, dtype=torch.bool, device=dev)  # [F, F] ancestor-or-self among fed nodes
        for d in range(1, depth):
            nf, n_fed = frontier.shape[0], fed_anc.shape[0]
            parent_rows = torch.zeros(nf, n_fed, dtype=torch.bool, device=dev)
            has_parent = f_parent_fed >= 0
            if n_fed:
                parent_rows[has_parent] = fed_anc[f_parent_fed[has_parent]]
            own = torch.cat([parent_rows, torch.eye(nf, dtype=torch.bool, device=dev)], dim=1)  # [nf, n_fed + nf]
            mask = torch.cat([torch.ones(nf, self.length, dtype=torch.bool, device=dev), own], dim=1)
            positions = torch.full((nf,), pos_root + d, device=dev)
            out = self._run(f_feat, f_tok, positions, self.length + n_fed, mask)  # tree entries after the true pairs
            grown = torch.zeros(n_fed + nf, n_fed + nf, dtype=torch.bool, device=dev)
            grown[:n_fed, :n_fed] = fed_anc
            grown[n_fed:] = own
            fed_anc = grown
            child_tok, child_lp, child_val = expand(f_val, self._logp(out), k)  # [nf, k] each
            child_tok = self._token(child_tok)
            cand_tok.append(child_tok.flatten())
            cand_par.append(frontier.repeat_interleave(k))
            cand_val.append(child_val.flatten())
            cand_lp.append(child_lp.flatten())
            sel = select_frontier(child_val, k)  # [k'] flat indices
            frontier = n_cand + sel
            n_cand += nf * k
            f_tok, f_val = child_tok.flatten()[sel], child_val.flatten()[sel]
            f_feat = out[sel // k]
            f_parent_fed = n_fed + sel // k
        return rerank(root, torch.cat(cand_tok), torch.cat(cand_par).long(), torch.cat(cand_val),
                      torch.cat(cand_lp), total_tokens - 1)

    def _grow_static(self, root: Tensor, root_out: Tensor, parents: tuple, depths: tuple, ranks: tuple) -> Tree:
        """EAGLE-1 / chain: a fixed shape; node tokens are the parent's rank-r draft choices."""
        dev = root.device
        n = len(parents)
        tokens = [int(root)] + [0] * (n - 1)
        logp = [0.0] * n
        par_t = torch.tensor(parents, device=dev)
        anc = build_tree(torch.zeros(n, dtype=torch.long, device=dev), par_t).mask  # static ancestry
        has_child = [False] * n
        for p in parents[1:]:
            has_child[p] = True
        out_of: dict[int, Tensor] = {0: root_out}  # node -> head output (its children's feature)
        fed: list[int] = []
        pos_root = self.length - 1
        max_d = max(depths)
        for d in range(1, max_d + 1):
            level = [i for i in range(n) if depths[i] == d]
            owners = sorted({parents[i] for i in level})
            lp = self._logp(torch.stack([out_of[o] for o in owners]))  # [F, V]
            width = max(ranks[i] for i in level) + 1
            top = lp.topk(width, dim=-1)
            row = {o: j for j, o in enumerate(owners)}
            ti, tv = self._token(top.indices).tolist(), top.values.tolist()
            for i in level:
                tokens[i] = ti[row[parents[i]]][ranks[i]]
                logp[i] = tv[row[parents[i]]][ranks[i]]
            feed = [i for i in level if has_child[i]]
            if d == max_d or not feed:
                continue
            idx = torch.tensor(feed, device=dev)
            own = anc[idx][:, fed + feed] if fed else torch.eye(len(feed), dtype=torch.bool, device=dev)
            mask = torch.cat([torch.ones(len(feed), self.length, dtype=torch.bool, device=dev), own], dim=1)
            feats = torch.stack([out_of[parents[i]] for i in feed])
            toks = torch.tensor([tokens[i] for i in feed], device=dev)
            out = self._run(feats, toks, torch.full((len(feed),), pos_root + d, device=dev), self.length + len(fed), mask)
            fed += feed
            for j, i in enumerate(feed):
                out_of[i] = out[j]
        return build_tree(torch.tensor(tokens, device=dev), par_t, torch.tensor(logp, device=dev))


def _lean_head(head: DraftHead, target: Target) -> tuple[Stack, Linear]:
    """The head's decoder layer as a one-layer ``fast.Stack`` (no input norm, no final norm) and
    its fc, in the target's dtype and device with prepacked linears where exact (kernels.py).
    The caller's head object is left as it was; the lean layer equals its forward (tested)."""
    cfg = head.config
    sd = {k: v.detach().to(device=target.device, dtype=target.dtype) for k, v in head.state_dict().items()}
    a, m = "layers.0.self_attn.", "layers.0.mlp."
    qkv_b = tuple(sd[a + f"{n}_proj.bias"] for n in "qkv") if cfg.attention_bias else None
    layer = Layer.fuse(None, sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"], sd[a + "o_proj.weight"],
                       sd["layers.0.post_attention_layernorm.weight"], sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"],
                       sd[m + "down_proj.weight"], qkv_b)
    dims = Dims(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size,
                float(cfg.rms_norm_eps), cfg.hidden_act)
    return Stack([layer], None, dims), linear(sd["fc.weight"], sd.get("fc.bias"))
