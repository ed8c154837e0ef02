"""Draft trees as plain tensors: expansion steps, rerank, masks, positions, retrieve indices.

Pure functions over tensors; nothing here imports a model. The drafter (``draft.py``) calls
them between draft-head forwards, the engine uses the resulting ``Tree`` to verify.

Glossary (used by every module of the package):
- root: the last accepted token (the previous round's bonus token); node 0 of every tree.
  The target has not seen it yet, so it is verified together with the drafts.
- node: a drafted token in the tree; ``parents[i] < i`` (parents precede children).
- depth: a node's distance from the root (root 0).
- value: the sum of the draft's log-probs along the path root -> node (EAGLE-2's value; the
  product of the draft's confidences). A child's value never exceeds its parent's.
- tree mask: ``mask[i, j]`` is True when node j is node i itself or one of its ancestors;
  during verification each node attends to the whole prefix plus exactly these nodes.
- positions: ``prefix_len + depth`` per node (siblings share a position).
- retrieve indices: one row per leaf listing node indices on the root -> leaf path, -1 padded.
- accept length: drafted nodes accepted in a round; the round also emits one bonus token,
  sampled (or argmax-ed) from the target at the last accepted node.
- sampled draft (T > 0): a child drawn from the draft's distribution q rather than taken as its
  top-k; its draw rank is its place among its siblings in draw order (index order). Its reach
  probability is the chance it is accepted, from acceptance rates by draw rank and a row: the
  depth (fixed shapes) or the confidence of its parent's draft distribution (the adaptive tree).
- confidence: the largest probability in the draft distribution a node's children are drawn from.
- prompt-lookup chain (the adaptive tree at T <= ``TreeConfig.draw_above``, where it is top-k): tokens
  copied from the context after an earlier occurrence of its last few tokens (lookup.py), merged into
  the candidates from the root (``merge_chain``). A copy hit is an answer position whose next token
  that chain would propose first (``lookup.copy_hits``; the trainer's ``--lookup-weight`` weighs them).
- untrained head: the fresh one ``eagle2.load`` makes for a model without a trained head; the
  cost-aware tree then verifies only the prompt-lookup chain (``chain_tree``; above ``draw_above``,
  where there is none, the root alone), never the head's guesses, which would cost more than they return.
- reused prefix: the prompt tokens whose target keys/values a recent call left in its cache
  (engine.py; a chat's earlier turns), which the next call does not prefill again.
- compute thread: the one thread that runs a loaded generator's rounds asked for on threads other
  than the main one (compute.py; torch keeps a CPU thread pool per thread that computes).
- side by side: several decodes advanced together, one target forward of each per step, the forwards
  run as one (engine.py ``step_together``, ``Target.forward_many``); a server's requests run so.

Worked example: tokens [r, a, b, c] with parents [-1, 0, 0, 1] (a, b children of the root,
c child of a) and a prefix of 7 tokens give depths [0, 1, 1, 2], positions [7, 8, 8, 9],
retrieve [[0, 1, 3], [0, 2, -1]] and mask rows r:{r}, a:{r,a}, b:{r,b}, c:{r,a,c}.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tree:
    tokens: Tensor  # [N] long, node 0 = root
    parents: Tensor  # [N] long, parent node index, -1 for the root
    depths: Tensor  # [N] long
    mask: Tensor  # [N, N] bool, ancestor-or-self
    retrieve: Tensor  # [P, D + 1] long, root -> leaf node indices, -1 padded
    draft_logp: Tensor  # [N] float, draft log-prob of each node given its parent (root: 0)
    # Sampled drafting (T > 0) only: row i is the draft distribution node i's children were drawn
    # from, without replacement in index order (zeros for a leaf); column j is token q_ids[j]
    # (q_ids None: column j is token j). None: the children are deterministic choices.
    draft_q: Tensor | None = None  # [N, Vq] fp32
    q_ids: Tensor | None = None  # [Vq] long

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])


def _root_paths(parents: list[int]) -> list[list[int]]:
    """Each node's root -> node path, node indices ascending (a parent's path plus the node). A round's
    tree has a few dozen nodes at most: Python lists here, then a handful of tensor calls, where
    whole-tensor passes over the mask would take ~40 small calls."""
    paths: list[list[int]] = []
    for i, p in enumerate(parents):
        if p >= i:
            raise ValueError("every node's parent must precede it (parents[i] < i)")
        paths.append([i] if p < 0 else paths[p] + [i])
    return paths


def _path_mask(paths: list[list[int]], device: torch.device) -> Tensor:
    """[N, N] bool: row i is True on node i's path (itself and its ancestors)."""
    n = len(paths)
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[[i for i, a in enumerate(paths) for _ in a], [j for a in paths for j in a]] = True
    return mask


def ancestor_mask(parents: Tensor) -> Tensor:
    """[N] parents (-1 = none, parents[i] < i) -> [N, N] bool ancestor-or-self mask."""
    return _path_mask(_root_paths(parents.tolist()), parents.device)


def build_tree(tokens: Tensor, parents: Tensor, draft_logp: Tensor | None = None) -> Tree:
    """Derive depths, mask and retrieve indices from tokens + parents (parents precede children)."""
    dev = tokens.device
    par = parents.tolist()
    paths = _root_paths(par)
    depths = torch.tensor([len(a) - 1 for a in paths], dtype=torch.long, device=dev)
    is_parent = set(par)
    width = max((len(a) for a in paths), default=1)
    retrieve = torch.tensor([a + [-1] * (width - len(a)) for i, a in enumerate(paths) if i not in is_parent],
                            dtype=torch.long, device=dev).view(-1, width)
    if draft_logp is None:
        draft_logp = torch.zeros(len(par), device=dev)
    return Tree(tokens, parents, depths, _path_mask(paths, dev), retrieve, draft_logp)


def single_node_tree(root: Tensor) -> Tree:
    """The tree of vanilla decoding: just the root."""
    dev = root.device
    return build_tree(root.view(1), torch.full((1,), -1, dtype=torch.long, device=dev))


def chain_tree(root: Tensor, chain: tuple[list[int], list[float]], budget: "Budget") -> Tree:
    """A round's tree from a prompt-lookup chain alone (no head's drafts): the chain's prefix with the
    most expected tokens per millisecond (``best_size``), its nodes' path probabilities the products of
    their log-probabilities (each given the ones before it); just the root when none pays."""
    tokens, logp = chain
    probs, total = [], 0.0
    for lp in logp:
        total += lp
        probs.append(min(1.0, math.exp(total)))
    keep = best_size(probs, budget.verify_ms, budget.fixed_ms)[0] if tokens else 0
    if keep == 0:
        return single_node_tree(root)
    dev = root.device
    return build_tree(torch.tensor([int(root)] + tokens[:keep], device=dev), torch.arange(-1, keep, device=dev),
                      torch.tensor([0.0] + logp[:keep], device=dev))


def expand(frontier_values: Tensor, logp: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """One EAGLE-2 expansion step.

    frontier_values: [F] values of the nodes just fed to the draft; logp: [F, V] the draft's
    log-probs of their children. Returns child tokens [F, k], child log-probs [F, k] and
    child values [F, k] = parent value + log p(child)."""
    top = logp.topk(top_k, dim=-1)
    child_logp = top.values.clamp(max=0.0)  # log_softmax can round a hair above 0
    return top.indices, child_logp, frontier_values[:, None] + child_logp


def select_frontier(child_values: Tensor, top_k: int) -> Tensor:
    """Flat indices [k] of the k best of all [F, k] children: the next frontier."""
    flat = child_values.flatten()
    return flat.topk(min(top_k, flat.numel())).indices


def rerank(root: Tensor, tokens: Tensor, parents: Tensor, values: Tensor, logp: Tensor, keep: int) -> Tree:
    """EAGLE-2 rerank: keep the ``keep`` candidates of highest value, plus the root.

    Candidates are listed in generation order (a parent is always listed before its
    children; parents index candidates, -1 = root). A child's value never exceeds its
    parent's, and a *stable* descending sort puts a parent before its children on ties, so
    every kept node's parent is kept: the result is a connected tree. Kept nodes are then put
    back in generation order, so parents still precede children.
    """
    values = torch.nan_to_num(values, nan=float("-inf"))
    kept = sorted(values.sort(descending=True, stable=True).indices[:keep].tolist())  # generation order
    new_index = {c: i for i, c in enumerate(kept, 1)}
    par = parents.tolist()
    new_par = [0 if par[c] < 0 else new_index.get(par[c], -1) for c in kept]
    if -1 in new_par:  # impossible by the argument above; fail loudly if broken
        raise AssertionError("rerank dropped the parent of a kept node")
    dev = tokens.device
    idx = torch.tensor(kept, dtype=torch.long, device=dev)
    all_tokens = torch.cat([root.view(1), tokens[idx]])
    all_logp = torch.cat([torch.zeros(1, device=logp.device, dtype=logp.dtype), logp[idx]])
    return build_tree(all_tokens, torch.tensor([-1] + new_par, dtype=torch.long, device=dev), all_logp)


def merge_chain(tokens: Tensor, parents: Tensor, values: Tensor, logp: Tensor, chain: list[int],
                chain_logp: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Candidates (generation order, as ``rerank`` takes them) with a chain from the root merged in.

    chain: tokens that would follow the root one after another (lookup.py), chain_logp: each one's
    log-probability given the ones before it. Where the chain's next token already is a candidate
    child of the chain's node so far it follows that candidate, raising its value where the chain
    rates it higher (its parent's value plus its own log-probability); elsewhere it appends new
    candidates. A chain node's value is its parent's at most (log-probabilities are <= 0), so
    ``rerank`` still keeps every kept node's parent."""
    tok, par, val, lp = tokens.tolist(), parents.tolist(), values.tolist(), logp.tolist()
    index = {(p, t): i for i, (p, t) in enumerate(zip(par, tok))}
    node = -1
    for t, step in zip(chain, chain_logp):
        step = min(step, 0.0)
        value = (val[node] if node >= 0 else 0.0) + step
        i = index.get((node, t))
        if i is None:
            i = len(tok)
            index[(node, t)] = i
            tok.append(t)
            par.append(node)
            val.append(value)
            lp.append(step)
        elif value > val[i]:
            val[i], lp[i] = value, step
        node = i
    dev = tokens.device
    return (torch.tensor(tok, dtype=tokens.dtype, device=dev), torch.tensor(par, dtype=torch.long, device=dev),
            torch.tensor(val, dtype=values.dtype, device=dev), torch.tensor(lp, dtype=logp.dtype, device=dev))


def path_probs(tree: Tree) -> Tensor:
    """[N] the draft's probability of each node's whole path from the root (root: 1)."""
    return torch.where(tree.mask, tree.draft_logp[None, :], 0.0).sum(1).exp()  # [N, N] -> [N]


# ---- how much of the tree pays (the cost-aware rule) --------------------------------------------
# At T = 0 a node drafted with path probability p lies on the accepted path with probability ~p (the
# draft is calibrated), so a round verifying the root plus drafts with probabilities p_1..p_j yields
# 1 + p_1 + ... + p_j tokens in expectation (the accepted drafts plus the bonus token).


@dataclass(frozen=True)
class Budget:
    """What one round's tree may cost, in milliseconds of this machine (cost.py measures them)."""

    verify_ms: Tensor  # [max_nodes + 1] fp32: verifying n nodes (root included) over this round's cache
    level_ms: float  # one more draft level, apart from its rows
    fixed_ms: float  # the round's cost whatever its tree (commit, root logits, accept, cache keep)
    row_ms: float = 0.0  # each frontier node a draft level feeds to the head

    def level_cost(self, rows: int) -> float:
        return self.level_ms + rows * self.row_ms

    @property
    def max_nodes(self) -> int:
        return int(self.verify_ms.shape[0]) - 1

    def shared_by(self, n: int) -> "Budget":
        """This budget for a round whose verification runs in one forward with n - 1 other decodes' (a
        server's requests side by side): the cost of a forward's first row, mostly the reading of the
        weights, is split n ways; every further row costs what it costs alone. Fewer drafts then pay."""
        if n <= 1:
            return self
        v = self.verify_ms.clone()  # [max_nodes + 1]
        v[1:] -= float(v[1]) * (1.0 - 1.0 / n)
        return replace(self, verify_ms=v)


def _floats(x: Tensor | Sequence[float]) -> list[float]:
    return x.tolist() if isinstance(x, Tensor) else list(x)


def best_size(probs: Tensor | Sequence[float], verify_ms: Tensor | Sequence[float],
              spent_ms: float) -> tuple[int, float, float]:
    """How many drafts to verify: probs [M] calibrated path probabilities in rerank order (best
    first), verify_ms [>= M + 2]. Returns (j drafts, expected tokens, tokens per ms) for the j
    that maximises expected tokens per millisecond of the whole round (the first such j on ties).
    Plain floats: a few dozen candidates per call, several calls per round."""
    p, v = _floats(probs), _floats(verify_ms)
    m = min(len(p), len(v) - 2)
    best = (0, 1.0, 1.0 / (spent_ms + v[1]))
    expected = 1.0
    for j in range(1, m + 1):  # j drafts -> j + 1 nodes
        expected += p[j - 1]
        rate = expected / (spent_ms + v[j + 1])
        if rate > best[2]:
            best = (j, expected, rate)
    return best


def frontier_to_feed(probs: Tensor | Sequence[float], predicted: Tensor | Sequence[float],
                     verify_ms: Tensor | Sequence[float], spent_ms: float, level_ms: float,
                     row_ms: float = 0.0) -> int:
    """How many frontier nodes, best first, one more draft level should feed: 0 = stop growing.

    probs [M]: calibrated path probabilities of the candidates so far, best first; predicted [F]:
    what each frontier node's best child is expected to score, best first. A level costs
    ``level_ms`` plus ``row_ms`` per node fed. The same rule as ``best_size``, one level ahead: the
    nodes worth feeding are those whose predicted child enters the best-paying prefix of the merged
    list; they are fed when that prefix, after paying for the level, beats today's best prefix. A
    frontier node below that prefix could only add children that are not verified (a child never
    scores above its parent), so feeding it would cost a row and return nothing."""
    p, v, f = _floats(probs), _floats(verify_ms), _floats(predicted)

    def rate(n: int) -> float:  # the best prefix's tokens per ms after feeding the n best frontier nodes
        return best_size(sorted(p + f[:n], reverse=True), v, spent_ms + level_ms + n * row_ms)[2]

    merged = sorted(p + f, reverse=True)
    j = best_size(merged, v, spent_ms + level_ms + len(f) * row_ms)[0]
    n = sum(1 for x in f if x >= merged[j - 1]) if j else 0
    best = rate(n) if n else 0.0
    while n > 1:  # a marginal node's child may not repay its row
        fewer = rate(n - 1)
        if fewer < best:
            break
        n, best = n - 1, fewer
    return n if n and best > best_size(p, v, spent_ms)[2] else 0


# Prior acceptance rate of the draft's r-th ranked child (r = 0, 1, ...), used only to shape
# the default EAGLE-1 static tree: a rough profile of a trained head's top-k accuracy.
_RANK_PRIOR = (0.65, 0.12, 0.05, 0.03, 0.02, 0.015, 0.01, 0.008, 0.006, 0.005)


def static_tree_paths(total_tokens: int, depth: int, top_k: int) -> list[tuple[int, ...]]:
    """A static (EAGLE-1 style) tree: paths of child ranks, e.g. (0,), (1,), (0, 0), ...

    Best-first growth from the root under the rank prior keeps the ``total_tokens - 1`` paths
    with the highest prior probability, limited to ``depth`` levels and ``top_k`` children per
    node. Paths are returned sorted by depth, then by ranks, so parents precede children."""
    heap: list[tuple[float, tuple[int, ...]]] = [(-_RANK_PRIOR[0], (0,))]
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < total_tokens - 1:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        score = -neg
        r = path[-1]
        if r + 1 < min(top_k, len(_RANK_PRIOR)):  # next sibling
            sib = path[:-1] + (r + 1,)
            heapq.heappush(heap, (-(score / _RANK_PRIOR[r] * _RANK_PRIOR[r + 1]), sib))
        if len(path) < depth:  # first child
            heapq.heappush(heap, (-(score * _RANK_PRIOR[0]), path + (0,)))
    return sorted(chosen, key=lambda p: (len(p), p))


def sampled_tree_paths(accept: Tensor, max_nodes: int, max_depth: int, top_k: int
                       ) -> tuple[list[tuple[int, ...]], list[float]]:
    """The best static tree for sampled drafting, best first: (paths of draw ranks, reach probabilities).

    accept[d - 1, r]: probability that the rank-r draw at depth d is accepted, given that its parent
    was reached and its ranks < r were rejected (``cost.SampledAcceptance`` measures it). A node's
    reach probability is then its parent's x (1 - accept of each earlier sibling) x its own accept,
    which depends on ranks and depths only, never on the drawn tokens: the shape is fixed before
    any token is drawn, which is what keeps sampled verification exact (verify.py). Up to
    ``max_nodes`` paths; every path's parent and earlier siblings come before it."""
    rows, cols = accept.shape
    a = accept.tolist()

    def rate(depth: int, r: int) -> float:
        return a[min(depth, rows) - 1][min(r, cols - 1)]

    # (-reach, path, reach of its parent, probability that its earlier siblings were all rejected)
    heap: list[tuple[float, tuple[int, ...], float, float]] = [(-rate(1, 0), (0,), 1.0, 1.0)]
    paths: list[tuple[int, ...]] = []
    probs: list[float] = []
    while heap and len(paths) < max_nodes:
        neg, path, parent, miss = heapq.heappop(heap)
        paths.append(path)
        probs.append(-neg)
        d, r = len(path), path[-1]
        if r + 1 < top_k:  # the next draw at the same parent
            m = miss * (1.0 - rate(d, r))
            heapq.heappush(heap, (-parent * m * rate(d, r + 1), path[:-1] + (r + 1,), parent, m))
        if d < max_depth:  # this node's first draw
            heapq.heappush(heap, (neg * rate(d + 1, 0), path + (0,), -neg, 1.0))
    return paths, probs


def sampled_reach(parents: list[int], rows: list[int], accept: Tensor) -> list[float]:
    """[N] each node's probability of being accepted in a sampled tree (root: 1), by the rule of
    ``sampled_tree_paths``; siblings are in draw order (index order). rows[i]: the row of ``accept``
    node i was rated with (``cost.SampledAcceptance.rows``)."""
    n_rows, cols = accept.shape
    a = accept.tolist()
    reach = [1.0] * len(parents)
    miss: dict[int, float] = {}  # parent -> probability that its children so far were all rejected
    rank: dict[int, int] = {}
    for i, p in enumerate(parents):
        if p < 0:
            continue
        r = rank.get(p, 0)
        rate = a[min(rows[i], n_rows - 1)][min(r, cols - 1)]
        reach[i] = reach[p] * miss.get(p, 1.0) * rate
        miss[p], rank[p] = miss.get(p, 1.0) * (1.0 - rate), r + 1
    return reach


def sampled_size(probs: list[float], depths: list[int], budget: Budget) -> int:
    """How many of the best-first sampled paths to verify: the prefix with the most expected tokens
    per ms, paying one draft level for each level beyond the first that the prefix reaches."""
    m = min(len(probs), budget.max_nodes - 1)
    best_j, best_rate, expected, deepest = 0, 1.0 / (budget.fixed_ms + float(budget.verify_ms[1])), 1.0, 0
    for j in range(1, m + 1):
        expected += probs[j - 1]
        deepest = max(deepest, depths[j - 1])
        levels = (deepest - 1) * budget.level_cost(1)  # a sampled tree feeds about one node per level
        rate = expected / (budget.fixed_ms + levels + float(budget.verify_ms[j + 1]))
        if rate > best_rate:
            best_j, best_rate = j, rate
    return best_j


def sampled_children(reach: Sequence[float], rates: Sequence[Sequence[float]], width: int, nodes: int,
                     expected: float, spent_ms: float, verify_ms: Tensor | Sequence[float]) -> list[int]:
    """How many children to draw at each fed node of the adaptive sampled tree (T > 0).

    reach[i]: fed node i's reach probability; rates[i][r]: the chance its rank-r draw is accepted
    when tried (``cost.SampledAcceptance``, by the node's confidence). ``nodes`` are in the tree
    already (root included) with ``expected`` tokens (1 + their reaches); ``spent_ms`` is paid.
    Draws join best gain first, each node's in rank order, and the count kept is the one with the
    most expected tokens per ms. Every count is fixed before any of these children is drawn, so
    whether a child is verified never depends on its own token: what keeps sampled verification
    exact (verify.py)."""
    v = _floats(verify_ms)
    heap = [(-r * a[0], i, 0, 1.0) for i, (r, a) in enumerate(zip(reach, rates)) if width > 0 and r * a[0] > 0]
    heapq.heapify(heap)  # (-gain, node, rank, chance that its earlier draws were all rejected)
    order: list[int] = []
    best_m, best_rate = 0, expected / (spent_ms + v[nodes])
    while heap and nodes + len(order) + 1 < len(v):
        neg, i, r, miss = heapq.heappop(heap)
        order.append(i)
        expected -= neg
        rate = expected / (spent_ms + v[nodes + len(order)])
        if rate > best_rate:
            best_m, best_rate = len(order), rate
        a = rates[i]
        if r + 1 < width:
            miss *= 1.0 - a[min(r, len(a) - 1)]
            heapq.heappush(heap, (-reach[i] * miss * a[min(r + 1, len(a) - 1)], i, r + 1, miss))
    counts = [0] * len(reach)
    for i in order[:best_m]:
        counts[i] += 1
    return counts


def sampled_feed(predicted: Sequence[float], nodes: int, expected: float, spent_ms: float,
                 verify_ms: Tensor | Sequence[float], level_ms: float, row_ms: float = 0.0) -> int:
    """How many of the newest sampled nodes, best ``predicted`` first (each one's expected gain from
    its first draw), one more draft level should feed: 0 = stop. Feeding n costs the level, n rows
    and a verify row for each predicted child; the n with the most expected tokens per ms is
    chosen, if it beats stopping (``nodes``, ``expected``, ``spent_ms`` as in ``sampled_children``)."""
    v, f = _floats(verify_ms), sorted(predicted, reverse=True)
    best_n, best_rate = 0, expected / (spent_ms + v[nodes])
    for n in range(1, min(len(f), len(v) - 1 - nodes) + 1):
        expected += f[n - 1]
        rate = expected / (spent_ms + level_ms + n * row_ms + v[nodes + n])
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n


def static_tree_parents(paths: list[tuple[int, ...]]) -> list[int]:
    """Parent node index (root = 0, nodes 1..n in ``paths`` order) for each path."""
    index = {(): 0}
    for i, p in enumerate(paths, 1):
        index[p] = i
    try:
        return [index[p[:-1]] for p in paths]
    except KeyError as e:
        raise ValueError(f"static tree path {e} has no parent path listed before it") from None
