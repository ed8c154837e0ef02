"""The drafter: grows one draft tree per round with the draft head.

Owns the head's static KV cache (fast.StaticCache, one layer per head layer) and runs the head's layers on
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

``Eagle3Drafter`` runs an EAGLE-3 head (eagle3_head.py) under the same protocol: the committed
features are the target's three captured layers [n, 3H] (fc fuses them), a tree node's feature is
its parent's head output [H] (fc skipped), and its draft logits, over the head's own vocabulary,
name tokens through d2t. Its midlayer runs on fast.Stack like the EAGLE-1/2 layer (natively on a CPU),
the 2H-wide [embedding, feature] given as the attention's input beside the H-wide residual stream.
``make_drafter`` picks one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch
from torch import Tensor

from . import masks
from .config import Backend, TreeConfig
from .cost import SampledAcceptance
from .draft_head import DraftHead
from .eagle3_head import Eagle3Head
from .fast import Dims, Layer, RotaryTable, Stack, StaticCache, additive_mask, rms
from .kernels import Linear, linear, lowbit_usable, round_to_q8
from .target import Target, cap_logits
from .tree import (Budget, Tree, best_size, build_tree, expand, frontier_to_feed, merge_chain, rerank,
                   sampled_children, sampled_feed, sampled_size, sampled_tree_paths, select_frontier,
                   single_node_tree, static_tree_parents, static_tree_paths)


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


@dataclass(frozen=True)
class Draw:
    """Sampled drafting, for T > 0: each expanded node's children are drawn from the draft's
    distribution at ``temperature`` without replacement (Gumbel top-k, in draw order) instead of
    taken as its top-k, and the tree carries those distributions for verification. A sampled child
    is accepted with probability min(1, p / q), on average 1 - TV(p, q), where a deterministic
    top-1 child gets only p(x). ``accept`` ([rows, R] rates by row and draw rank,
    ``cost.SampledAcceptance``: rows are confidences for the adaptive tree, depths for a fixed
    ``eagle2`` shape) shapes the ``eagle2`` tree."""

    temperature: float
    generator: torch.Generator
    accept: Tensor  # [D, R]


def _sampled_layout(draw: Draw, cfg: TreeConfig, max_depth: int, budget: Budget | None, vocab: int):
    """(paths, parents, depths, ranks) of a sampled round's eagle2 tree: the best-first paths under
    the acceptance rates, as many as the cost rule pays for (with a budget) or ``total_tokens - 1``;
    at most ``vocab`` (the draft vocabulary's size) draws per node."""
    cap = (budget.max_nodes - 1) if (cfg.dynamic and budget is not None) else cfg.total_tokens - 1
    depth = min(cfg.depth_cap, max_depth)
    paths, probs = sampled_tree_paths(draw.accept, cap, depth, min(cfg.width, vocab))
    if cfg.dynamic and budget is not None:
        paths = paths[: sampled_size(probs, [len(p) for p in paths], budget)]
    paths = sorted(paths, key=lambda p: (len(p), p))
    return paths, [-1] + static_tree_parents(paths), [0] + [len(p) for p in paths], [0] + [p[-1] for p in paths]


@dataclass(frozen=True)
class Committed:
    """A drafter's cache of committed pairs, set aside (``Drafter.hand_over``) to be taken back later."""

    cache: StaticCache
    pairs: int  # committed true pairs (f_i, t_{i+1}) at cache entries 0..pairs-1


class Drafter:
    def __init__(self, head: DraftHead, target: Target, draft_vocab: int | None = None, capacity: int = 1024,
                 backend: Backend | None = None):
        """draft_vocab: propose only the first N tokens of the head's draft vocabulary (None:
        all of it; 0: the full vocabulary). Heads without one draft over the full vocabulary.
        backend: the fast paths the head's layer and linears may take (``Backend()``: all)."""
        self.target = target
        self.head = head
        self.backend = backend or Backend()
        self.stack, self.fc = _lean_head(head, target, self.backend)  # the head's layer on fast.Stack, target dtype
        self.feature_width = head.config.hidden_size  # width of a committed feature: the target's last hidden
        self.cache = StaticCache(1, 1, head.config.num_key_value_heads, head.config.head_dim, capacity,
                                 target.dtype, target.device)
        self.rope = RotaryTable(self._rope_rows)  # the head's own theta, no scaling
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
                          None if src is None else src[self.vocab_ids.cpu()],
                          self.backend.packed_linear)  # the draft's own [N, H] lm_head

    def reset(self) -> None:
        self.length = 0

    def hand_over(self) -> "Committed":
        """The committed pairs, set aside to be taken back later (``resume``: a decode that waits while
        another drafts, or the cost probe); the drafter goes on with an empty cache of its own."""
        done = Committed(self.cache, self.length)
        self.cache, self.length = self.cache.empty_like(), 0
        return done

    def resume(self, done: "Committed") -> None:
        """Continue from pairs set aside by ``hand_over``."""
        self.cache, self.length = done.cache, done.pairs

    def _rope_rows(self, n: int) -> tuple[Tensor, Tensor]:
        """cos, sin [n, D] for positions 0..n-1, as ``DraftHead.rope`` computes them."""
        cos, sin = self.head.rope(torch.arange(n, device=self.head.inv_freq.device)[None], self.target.dtype)
        return cos[0, 0].to(self.target.device), sin[0, 0].to(self.target.device)

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [T] -> cos, sin [1, 1, T, D]."""
        cos, sin = self.rope.rows(positions)
        return cos[None, None], sin[None, None]

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
        mask = masks.causal(n, self.length, device=dev)
        out = self._run(features, tokens, positions, self.length, mask)
        self.length += n
        return out[-1]

    def _logp(self, out: Tensor, temperature: float = 1.0) -> Tensor:
        """[.., H] head outputs -> [.., N] fp32 log-probs over the draft vocabulary at ``temperature``
        (column j is token ``self._token(j)``)."""
        if self.vocab_ids is None:
            logits = self.target.logits(out)  # [.., V]
        else:
            logits = cap_logits(self._lm(out).float(), self.target.softcap)
        return torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)

    def _token(self, cols: Tensor) -> Tensor:
        return cols if self.vocab_ids is None else self.vocab_ids[cols]

    @torch.inference_mode()
    def grow(self, root: Tensor, root_out: Tensor, cfg: TreeConfig, max_depth: int, budget: Budget | None = None,
             draw: Draw | None = None, chain: tuple[list[int], list[float]] | None = None) -> Tree:
        """The round's tree. ``budget`` (with ``cfg.dynamic``) lets the cost rule pick its depth and size;
        ``draw`` (T > 0) draws the children instead of taking the top-k; ``chain`` (tokens and their
        log-probabilities, at most ``max_depth``; the cost-aware tree only) is merged into the
        candidates before the rule picks what to verify (prompt lookup, lookup.py). A node has at most
        ``vocab`` children, the draft vocabulary's size (FR-Spec's can be smaller than ``cfg.top_k``)."""
        vocab = self.target.vocab_size if self.vocab_ids is None else self.vocab_ids.shape[0]
        static_k = min(cfg.top_k, vocab)  # a fixed shape's children per node
        if draw is not None:
            if cfg.method == "eagle2" and cfg.dynamic and budget is not None:
                return self._grow_sampled(root, root_out, min(cfg.depth_cap, max_depth), min(cfg.width, vocab),
                                          budget, draw)
            layout = (_sampled_layout(draw, cfg, max_depth, budget, vocab) if cfg.method == "eagle2"
                      else _static_layout(cfg.method, cfg.total_tokens, min(cfg.depth, max_depth), static_k))
            if len(layout[1]) == 1:
                return single_node_tree(root)
            return self._grow_static(root, root_out, *layout[1:], draw=draw)
        if cfg.method == "eagle2":
            if cfg.dynamic and budget is not None:
                return self._grow_dynamic(root, root_out, min(cfg.max_depth, max_depth), cfg.width, budget.max_nodes,
                                          budget, chain)
            return self._grow_dynamic(root, root_out, min(cfg.depth, max_depth), cfg.top_k, cfg.total_tokens)
        depth = min(cfg.depth, max_depth)
        return self._grow_static(root, root_out, *_static_layout(cfg.method, cfg.total_tokens, depth, static_k)[1:])

    def _grow_dynamic(self, root: Tensor, root_out: Tensor, depth: int, top_k: int, total_tokens: int,
                      budget: Budget | None = None, chain: tuple[list[int], list[float]] | None = None) -> Tree:
        """EAGLE-2: expand the top_k frontier by value for up to ``depth`` levels, then rerank. With a
        budget, each level feeds only the frontier nodes that can pay for their row, growth stops at
        the first level that cannot pay for itself, and the best-paying prefix is kept."""
        k = min(top_k, self.target.vocab_size)
        k = min(k, self.vocab_ids.shape[0]) if self.vocab_ids is not None else k
        lvl = _Levels(self, root, root_out, k)
        if budget is not None and chain and chain[0]:  # the growth rule weighs the chain's nodes too
            first = merge_chain(lvl.cand_tok[0], lvl.cand_par[0].long(), lvl.cand_val[0], lvl.cand_lp[0], *chain)
            lvl.values = _finite(first[2].tolist())
        for d in range(1, depth):
            rows = lvl.frontier.shape[0] if budget is None else lvl.rows_to_feed(budget)
            if rows == 0:
                break
            lvl.feed_frontier(d, rows)
        cands = (torch.cat(lvl.cand_tok), torch.cat(lvl.cand_par).long(), torch.cat(lvl.cand_val),
                 torch.cat(lvl.cand_lp))  # tokens, parents, values, log-probs [M], generation order
        values = lvl.values
        if chain and chain[0]:
            cands = merge_chain(*cands, *chain)
            values = _finite(cands[2].tolist())
        keep = total_tokens - 1
        if budget is not None:
            keep = lvl.best_keep(budget, values)
        return rerank(root, *cands, keep)

    @torch.inference_mode()
    def probe_ms(self, top_k: int, repeats: int = 4, context: int = 200) -> tuple[float, float, float]:
        """(ms of a draft level apart from its rows, ms per frontier row, ms of a round's fixed drafting
        part) over ``context`` committed pairs: fixed-shape growth at depth 1, and at depth 4 with
        frontiers of 1 and of ``top_k`` nodes, in a cache of its own: a decode that waits between rounds
        (another stream's) finds its committed pairs as it left them."""
        dev = self.target.device
        g = torch.Generator().manual_seed(0)
        feats = torch.randn(context, self.feature_width, generator=g).to(dev, self.target.dtype)
        toks = torch.randint(0, self.target.vocab_size, (context,), generator=g).to(dev)
        root = toks[-1]
        held = self.hand_over()
        try:
            return self._probe(feats, toks, root, top_k, repeats, context)
        finally:
            self.resume(held)

    def _probe(self, feats: Tensor, toks: Tensor, root: Tensor, top_k: int, repeats: int, context: int
               ) -> tuple[float, float, float]:
        from .cost import _best_ms

        self.commit(feats[:-3], toks[:-3])

        def round_at(depth: int, width: int):
            def run():
                self.length = context - 3
                out = self.commit(feats[-3:], toks[-3:])
                self._grow_dynamic(root, out, depth, width, 2 + width * depth)
            return run

        one, narrow, wide = _best_ms([round_at(1, top_k), round_at(4, 1), round_at(4, top_k)], repeats)
        level_1, level_k = max(0.0, (narrow - one) / 3), max(0.0, (wide - one) / 3)
        row = max(0.0, (level_k - level_1) / (top_k - 1)) if top_k > 1 else 0.0
        return max(0.0, level_1 - row), row, one

    def _grow_sampled(self, root: Tensor, root_out: Tensor, depth: int, width: int, budget: Budget,
                      draw: Draw) -> Tree:
        """EAGLE-2 at T > 0: the tree grows where the draft is sure. Level by level, each fed node's
        distribution q is computed first; its confidence (largest probability) rates its draws
        (``draw.accept``, by confidence and rank), and ``tree.sampled_children`` decides how many to
        draw from it before any is drawn; then the newest nodes worth it are fed
        (``tree.sampled_feed``). Every drawn node is verified: none is dropped after its draw."""
        nodes = _SampledNodes(int(root))
        out_of: dict[int, Tensor] = {0: root_out}  # fed node -> head output (its children's feature)
        q_of: dict[int, Tensor] = {}  # node -> [Vq] the distribution its children were drawn from
        fed: list[int] = []  # fed nodes in head-cache order, after the committed pairs
        owners, spent = [0], budget.fixed_ms
        accept = draw.accept.tolist()
        for d in range(1, depth + 1):
            lp = self._logp(torch.stack([out_of[o] for o in owners]), draw.temperature)  # [F, Vq]
            q = lp.exp()
            rates = [accept[SampledAcceptance.confidence_row(c)] for c in q.max(-1).values.tolist()]
            counts = sampled_children([nodes.reach[o] for o in owners], rates, width, len(nodes.tokens),
                                      sum(nodes.reach), spent, budget.verify_ms)
            support = (q > 0).sum(-1).tolist()  # verify.py skips draws beyond it: never draw them
            counts = [min(c, s) for c, s in zip(counts, support)]
            if not any(counts):
                break
            idx = _gumbel_top(lp, max(counts), draw.generator)  # [F, k] in draw order
            ti, tv = self._token(idx).tolist(), lp.gather(-1, idx).tolist()
            new: list[tuple[float, int]] = []  # (predicted gain of its first draw, node)
            for j, o in enumerate(owners):
                q_of[o] = q[j]
                new += nodes.add_draws(o, ti[j][:counts[j]], tv[j][:counts[j]], rates[j])
            if d == depth:
                break
            new.sort(reverse=True)
            n = sampled_feed([g for g, _ in new], len(nodes.tokens), sum(nodes.reach), spent, budget.verify_ms,
                             budget.level_ms, budget.row_ms)
            if n == 0:
                break
            owners = [c for _, c in new[:n]]
            spent += budget.level_cost(n)
            self._feed(owners, nodes.tokens, nodes.parents, fed, out_of, d)
        return nodes.tree(root, q_of, self.vocab_ids)

    def _feed(self, feed: list[int], tokens: Sequence[int], parents: Sequence[int], fed: list[int],
              out_of: dict[int, Tensor], d: int) -> None:
        """Run the head over ``feed`` (depth-d nodes) after the ``fed`` ones; each attends to the
        committed pairs, its fed ancestors and itself. Fills ``out_of`` and extends ``fed``."""
        dev, nf, n_fed = out_of[0].device, len(feed), len(fed)
        at = {node: i for i, node in enumerate(fed)}
        own = torch.zeros(nf, n_fed + nf, dtype=torch.bool)  # [nf, n_fed + nf] ancestor-or-self among fed
        for j, c in enumerate(feed):
            p = parents[c]
            while p > 0:
                own[j, at[p]] = True
                p = parents[p]
            own[j, n_fed + j] = True
        mask = masks.after_prefix(own.to(dev), self.length)
        feats = torch.stack([out_of[parents[c]] for c in feed])
        toks = torch.tensor([tokens[c] for c in feed], device=dev)
        out = self._run(feats, toks, torch.full((nf,), self.length - 1 + d, device=dev), self.length + n_fed, mask)
        fed += feed
        for j, c in enumerate(feed):
            out_of[c] = out[j]

    def _grow_static(self, root: Tensor, root_out: Tensor, parents: tuple, depths: tuple, ranks: tuple,
                     draw: Draw | None = None) -> Tree:
        """EAGLE-1 / chain (and any tree at T > 0): a fixed shape; node tokens are the parent's rank-r
        draft choices, or with ``draw`` its r-th draw."""
        dev = root.device
        n = len(parents)
        tokens = [int(root)] + [0] * (n - 1)
        logp = [0.0] * n
        par_t = torch.tensor(parents, device=dev)
        has_child = [False] * n
        for p in parents[1:]:
            has_child[p] = True
        out_of: dict[int, Tensor] = {0: root_out}  # node -> head output (its children's feature)
        q_of: dict[int, Tensor] = {}  # node -> [Vq] the distribution its children were drawn from
        fed: list[int] = []
        max_d = max(depths)
        for d in range(1, max_d + 1):
            level = [i for i in range(n) if depths[i] == d]
            owners = sorted({parents[i] for i in level})
            lp = self._logp(torch.stack([out_of[o] for o in owners]), draw.temperature if draw else 1.0)  # [F, V]
            width = max(ranks[i] for i in level) + 1
            row = {o: j for j, o in enumerate(owners)}
            if draw is None:
                top = lp.topk(width, dim=-1)
                ti, tv = self._token(top.indices).tolist(), top.values.tolist()
            else:
                idx = _gumbel_top(lp, width, draw.generator)  # [F, width] in draw order
                ti, tv = self._token(idx).tolist(), lp.gather(-1, idx).tolist()
                for j, o in enumerate(owners):
                    q_of[o] = lp[j].exp()
            for i in level:
                tokens[i] = ti[row[parents[i]]][ranks[i]]
                logp[i] = tv[row[parents[i]]][ranks[i]]
            feed = [i for i in level if has_child[i]]
            if d < max_d and feed:
                self._feed(feed, tokens, parents, fed, out_of, d)
        tree = build_tree(torch.tensor(tokens, device=dev), par_t, torch.tensor(logp, device=dev))
        return tree if draw is None else _with_draft_q(tree, q_of, self.vocab_ids)


@dataclass
class _SampledNodes:
    """The nodes of one adaptive sampled tree as it grows (node 0 = the root), as Python lists."""

    root: int
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)  # draft log-prob at the request's temperature
    reach: list[float] = field(default_factory=list)  # the chance each is accepted (root: 1)

    def __post_init__(self) -> None:
        self.tokens, self.parents, self.logp, self.reach = [self.root], [-1], [0.0], [1.0]

    def add_draws(self, owner: int, tokens: list[int], logp: list[float], rates: list[float]
                  ) -> list[tuple[float, int]]:
        """Append ``owner``'s draws in draw order, rated by ``rates`` (by rank); returns each new
        node's predicted gain from its own first draw, taken at its parent's first-draw rate (a
        child drafts about as surely as its parent)."""
        new, miss = [], 1.0
        for r, (t, lp) in enumerate(zip(tokens, logp)):
            rate = rates[min(r, len(rates) - 1)]
            self.tokens.append(t)
            self.parents.append(owner)
            self.logp.append(lp)
            self.reach.append(self.reach[owner] * miss * rate)
            miss *= 1.0 - rate
            new.append((self.reach[-1] * rates[0], len(self.tokens) - 1))
        return new

    def tree(self, root: Tensor, q_of: dict[int, Tensor], q_ids: Tensor | None) -> Tree:
        """The verified tree, carrying each parent's draw distribution (zeros for a leaf)."""
        if len(self.tokens) == 1:
            return single_node_tree(root)
        dev = root.device
        tree = build_tree(torch.tensor(self.tokens, device=dev), torch.tensor(self.parents, device=dev),
                          torch.tensor(self.logp, device=dev))
        return _with_draft_q(tree, q_of, q_ids)


def _with_draft_q(tree: Tree, q_of: dict[int, Tensor], q_ids: Tensor | None) -> Tree:
    """``tree`` carrying, for each node in ``q_of``, the distribution its children were drawn from
    (zeros for a leaf), over the draft columns ``q_ids``."""
    q = torch.zeros(tree.size, next(iter(q_of.values())).shape[0], dtype=torch.float32,
                    device=tree.tokens.device)  # [N, Vq]
    for o, row in q_of.items():
        q[o] = row
    return replace(tree, draft_q=q, q_ids=q_ids)


def _gumbel_top(logp: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """[F, V] log-probs -> [F, k] column indices drawn without replacement, in draw order: the top-k of
    log-prob + Gumbel noise is distributed as k successive draws, each renormalized over the rest."""
    u = torch.rand(logp.shape, generator=generator, device=logp.device).clamp_(min=1e-20)
    return (logp - (-u.log()).log()).topk(k, dim=-1).indices


class _Levels:
    """One round of EAGLE-2 growth: the candidates drafted so far and the frontier to feed next.

    Candidates are listed in generation order (parents before children; ``cand_par`` indexes
    candidates, -1 = the root). The frontier holds the ``k`` best children of the last level, best
    first. The values the cost rule reads are also kept as Python floats (``values``, ``f_values``):
    it weighs a few dozen of them several times a round, where tensor ops cost more than the sums."""

    def __init__(self, drafter: "Drafter", root: Tensor, root_out: Tensor, k: int):
        self.dr, self.k, self.dev = drafter, k, root.device
        tok, lp, val = expand(torch.zeros(1, device=self.dev), drafter._logp(root_out)[None], k)  # [1, k] each
        tok = drafter._token(tok)
        self.cand_tok, self.cand_lp, self.cand_val = [tok[0]], [lp[0]], [val[0]]
        self.cand_par = [torch.full((k,), -1, device=self.dev)]
        self.n_cand = k
        self.frontier = torch.arange(k, device=self.dev)  # candidate indices of the nodes to feed next
        self.f_tok, self.f_val, self.f_feat = tok[0], val[0], root_out.expand(k, -1)
        self.f_parent_fed = torch.full((k,), -1, dtype=torch.long, device=self.dev)  # parent's index among fed nodes
        self.fed_anc = torch.zeros(0, 0, dtype=torch.bool, device=self.dev)  # [F, F] ancestor-or-self among fed
        self.values: list[float] = _finite(val[0].tolist())  # every candidate's value, generation order
        self.f_values = list(self.values)  # the frontier's values, best first
        self.levels = 0  # draft levels run after the root's (which the commit paid for)
        self.rows = 0  # frontier nodes fed in those levels
        self.top1 = min(1.0, math.exp(self.values[0]))  # the draft's confidence in its best child, last level

    def feed_frontier(self, d: int, rows: int) -> None:
        """Run the head over the ``rows`` best frontier nodes (depth d) and add their children (depth
        d + 1) as candidates; the frontier is kept best first (``select_frontier``)."""
        dr, dev, k = self.dr, self.dev, self.k
        if rows < self.frontier.shape[0]:
            self.frontier, self.f_tok, self.f_val = self.frontier[:rows], self.f_tok[:rows], self.f_val[:rows]
            self.f_feat, self.f_parent_fed = self.f_feat[:rows], self.f_parent_fed[:rows]
        nf, n_fed = self.frontier.shape[0], self.fed_anc.shape[0]
        parent_rows = torch.zeros(nf, n_fed, dtype=torch.bool, device=dev)
        has_parent = self.f_parent_fed >= 0
        if n_fed:
            parent_rows[has_parent] = self.fed_anc[self.f_parent_fed[has_parent]]
        own = torch.cat([parent_rows, torch.eye(nf, dtype=torch.bool, device=dev)], dim=1)  # [nf, n_fed + nf]
        mask = masks.after_prefix(own, dr.length)
        positions = torch.full((nf,), dr.length - 1 + d, device=dev)  # the root's pair sits at length - 1
        out = dr._run(self.f_feat, self.f_tok, positions, dr.length + n_fed, mask)  # tree entries after true pairs
        grown = torch.zeros(n_fed + nf, n_fed + nf, dtype=torch.bool, device=dev)
        grown[:n_fed, :n_fed] = self.fed_anc
        grown[n_fed:] = own
        self.fed_anc = grown
        tok, lp, val = expand(self.f_val, dr._logp(out), k)  # [nf, k] each
        tok = dr._token(tok)
        self.cand_tok.append(tok.flatten())
        self.cand_par.append(self.frontier.repeat_interleave(k))
        self.cand_val.append(val.flatten())
        self.cand_lp.append(lp.flatten())
        sel = select_frontier(val, k)  # [k'] flat indices, best first
        self.frontier = self.n_cand + sel
        self.n_cand += nf * k
        self.f_tok, self.f_val = tok.flatten()[sel], val.flatten()[sel]
        self.f_feat = out[sel // k]
        self.f_parent_fed = n_fed + sel // k
        new_values, picked, best_child = _finite(val.flatten().tolist()), sel.tolist(), lp[:, 0].tolist()
        self.values += new_values
        self.f_values = [new_values[i] for i in picked]
        # the frontier's path probabilities weigh its nodes' top-1 confidences
        w = [math.exp(v) for v in self.f_values]
        self.top1 = sum(math.exp(best_child[i // k]) * wi for i, wi in zip(picked, w)) / max(sum(w), 1e-12)
        self.levels += 1
        self.rows += nf

    def _sorted_probs(self, values: list[float] | None = None) -> list[float]:
        """Every candidate's path probability (or these values'), best first: its expected acceptance at T = 0."""
        return [min(1.0, math.exp(v)) for v in sorted(self.values if values is None else values, reverse=True)]

    def _spent_ms(self, budget: Budget) -> float:
        return budget.fixed_ms + self.levels * budget.level_ms + self.rows * budget.row_ms

    def best_keep(self, budget: Budget, values: list[float] | None = None) -> int:
        """Drafts to verify: the prefix of the rerank order (of ``values``: the candidates' with a merged
        chain) with the best expected tokens per ms."""
        return best_size(self._sorted_probs(values), budget.verify_ms, self._spent_ms(budget))[0]

    def rows_to_feed(self, budget: Budget) -> int:
        """How many frontier nodes the next level should feed (0: stop): each one's best child is
        predicted at the last level's top-1 confidence (``tree.frontier_to_feed``)."""
        predicted = [min(1.0, math.exp(v)) * self.top1 for v in self.f_values]
        return frontier_to_feed(self._sorted_probs(), predicted, budget.verify_ms, self._spent_ms(budget),
                                budget.level_ms, budget.row_ms)


def _finite(values: list[float]) -> list[float]:
    """NaN values (a broken forward) as -inf: never worth verifying, as ``rerank`` treats them."""
    return [v if v == v else -math.inf for v in values]


def _lean_head(head: DraftHead, target: Target, backend: Backend) -> tuple[Stack, Linear]:
    """The head's decoder layer as a one-layer ``fast.Stack`` (no input norm, no final norm) and
    its fc, in the target's dtype and device with the fast paths ``backend`` allows (kernels.py).
    The caller's head object is left as it was; the lean layer equals its forward (tested), with its
    projections rounded as below where they are.

    Where the block kernel runs (``backend.lowbit``), the layer's and the fc's weights are rounded to
    8-bit blocks (``kernels.round_to_q8``: at most 1/254 of a block's largest magnitude) and read as such. Each round's
    target forward streams the whole model through the caches, so the head's weights come back from
    memory at every commit: a 1.06-byte weight is what makes that cheap. Draft numerics never change
    what the target accepts, only how often it accepts."""
    cfg = head.config
    sd = {k: v.detach().to(device=target.device, dtype=target.dtype) for k, v in head.state_dict().items()}
    source = _q8_weights(sd, backend)
    a, m = "layers.0.self_attn.", "layers.0.mlp."
    qkv_b = tuple(sd[a + f"{n}_proj.bias"] for n in "qkv") if cfg.attention_bias else None
    layer = Layer.fuse(None, sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"], sd[a + "o_proj.weight"],
                       sd["layers.0.post_attention_layernorm.weight"], sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"],
                       sd[m + "down_proj.weight"], qkv_b, source=source, pack=backend.packed_linear)
    dims = Dims(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size,
                float(cfg.rms_norm_eps), cfg.hidden_act)
    fc = linear(sd["fc.weight"], sd.get("fc.bias"), source(sd["fc.weight"]), pack=backend.packed_linear)
    # The target's numerics choice: where it is row-invariant its attention is also the faster one on
    # the few rows a draft step has (ATen's flash kernel costs ~0.1 ms even on 1 row).
    return Stack([layer], None, dims, exact=bool(backend.exact), use_native=backend.native), fc


def _q8_weights(sd: dict[str, Tensor], backend: Backend):
    """Round the head's projection weights in ``sd`` to 8-bit blocks in place where the block kernel
    serves them here; returns weight -> its fp32 block values (None for any other tensor)."""
    sources: dict[int, Tensor] = {}
    if backend.lowbit and backend.native:
        for name, w in sd.items():
            if name.endswith("proj.weight") or name in ("fc.weight", "lm_head.weight"):
                if lowbit_usable(w):
                    v = round_to_q8(w)
                    sd[name] = v.to(w.dtype)
                    sources[id(sd[name])] = v
    return lambda w: sources.get(id(w))


def make_drafter(head: DraftHead | Eagle3Head, target: Target, draft_vocab: int | None = None,
                 backend: Backend | None = None) -> Drafter:
    """The drafter for this kind of head (EAGLE-1/2 or EAGLE-3), with the fast paths ``backend`` allows."""
    if isinstance(head, Eagle3Head):
        return Eagle3Drafter(head, target, draft_vocab, backend=backend)
    return Drafter(head, target, draft_vocab, backend=backend)


class Eagle3Drafter(Drafter):
    """``Drafter`` for an EAGLE-3 head: same commit / grow protocol and tree code; its own step
    (fc only on the target's 3H features, the midlayer, logits over the draft vocabulary)."""

    def __init__(self, head: Eagle3Head, target: Target, draft_vocab: int | None = None, capacity: int = 1024,
                 backend: Backend | None = None):
        """draft_vocab: must be None (the head drafts over its own vocabulary, fixed by its lm_head)."""
        cfg = head.config
        if draft_vocab is not None and draft_vocab != cfg.draft_vocab_size:
            raise ValueError(f"an EAGLE-3 head drafts over its own {cfg.draft_vocab_size}-token vocabulary; "
                             f"draft_vocab={draft_vocab} cannot change it (leave it unset)")
        self.target, self.head, self.backend = target, head, backend or Backend()
        pack = self.backend.packed_linear
        self.feature_width = 3 * cfg.hidden_size  # the target's three captured layers
        sd = {k: v.detach().to(device=target.device, dtype=target.dtype) for k, v in head.state_dict().items()
              if k not in ("d2t", "t2d")}
        source = _q8_weights(sd, self.backend)  # 8-bit blocks where the kernel runs, as _lean_head
        layers = [_fused_layer(sd, "midlayer.", None, source, pack)]  # its input comes normed (``attn_input``)
        layers += [_fused_layer(sd, f"layers.{i}.", sd[f"layers.{i}.input_layernorm.weight"], source, pack)
                   for i in range(cfg.num_layers - 1)]
        self.n_in, self.n_hid = sd["midlayer.input_layernorm.weight"], sd["midlayer.hidden_norm.weight"]
        self.norm = sd["norm.weight"]
        self.dims = Dims(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size,
                         float(cfg.rms_norm_eps), cfg.hidden_act)
        # One native call per step, as the EAGLE-1/2 head's layer: its attention reads the 2H-wide
        # [embedding, feature] (``attn_input``) while the residual stream stays H wide.
        self.stack = Stack(layers, None, self.dims, exact=bool(self.backend.exact), use_native=self.backend.native)
        self.fc = linear(sd["fc.weight"], sd.get("fc.bias"), source(sd["fc.weight"]), pack=pack)
        self._lm = linear(sd["lm_head.weight"], None, source(sd["lm_head.weight"]), pack=pack)  # [Vd, H]
        self.vocab_ids = head.target_ids.to(target.device)  # [Vd] token id of each draft logit column (d2t applied)
        self.cache = StaticCache(cfg.num_layers, 1, cfg.num_key_value_heads, cfg.head_dim, capacity, target.dtype,
                                 target.device)
        self.rope = RotaryTable(self._rope_rows)
        self.length = 0

    def set_draft_vocab(self, n: int | None) -> None:
        raise ValueError("an EAGLE-3 head drafts over its own vocabulary; it cannot be changed")

    def _run(self, feats: Tensor, tokens: Tensor, positions: Tensor, at: int, mask: Tensor) -> Tensor:
        """feats [T, 3H] (target layers) or [T, H] (head outputs), tokens [T], positions [T],
        mask [T, at + T] bool -> head outputs [T, H] before the final norm."""
        cache = self.cache
        cache.length = at
        cache.reserve(tokens.shape[0])
        emb = self.target.embed(tokens[None])  # [1, T, H]
        h = feats[None].to(emb.dtype)
        if h.shape[-1] != emb.shape[-1]:
            h = self.fc(h)  # [1, T, 3H] -> [1, T, H]
        cos, sin = self._rope(positions)
        eps, nat = self.dims.eps, self.backend.native
        hn = rms(self.n_hid, h, eps, nat)
        residual = hn if self.head.config.norm_before_residual else h
        x = torch.cat([rms(self.n_in, emb, eps, nat), hn], dim=-1)  # [1, T, 2H]
        return self.stack(residual, cos, sin, additive_mask(mask[None], emb.dtype), cache, at, attn_input=x)[0]

    def _logp(self, out: Tensor, temperature: float = 1.0) -> Tensor:
        """[.., H] head outputs -> [.., Vd] fp32 log-probs at ``temperature`` (column j is token ``vocab_ids[j]``)."""
        return torch.log_softmax(self._lm(rms(self.norm, out, self.dims.eps, self.backend.native)).float() / temperature,
                                 dim=-1)


def _fused_layer(sd: dict[str, Tensor], prefix: str, input_norm: Tensor | None, source, pack: bool) -> Layer:
    """One decoder layer of an EAGLE-3 head's state dict (``midlayer.`` or ``layers.i.``) as a fast.Layer."""
    a, m = prefix + "self_attn.", prefix + "mlp."
    return Layer.fuse(input_norm, sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"],
                      sd[a + "o_proj.weight"], sd[prefix + "post_attention_layernorm.weight"],
                      sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"], sd[m + "down_proj.weight"],
                      source=source, pack=pack)
