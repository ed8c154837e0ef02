"""Acceptance: which drafted nodes the target keeps, and the bonus token. Pure tensor code.

Input is the tree and the target's logits at every node (the distribution of the token that
follows the node). Output is the accepted path (node indices, root first) and the bonus token.

- Greedy: a child is accepted when its token equals the target's argmax at its parent; the
  accepted root -> leaf prefix is followed down; bonus = argmax at the last accepted node. The
  output is then exactly the target's greedy decoding.
- Sampling: multi-candidate rejection sampling (SpecInfer). Siblings are tried in index order;
  child x, proposed from q, is accepted with probability min(1, p(x) / q(x)) under the current
  residual p; on rejection p becomes norm(max(p - q, 0)) and, the draws being without
  replacement, q loses x and is renormalized before the next sibling. If every child is rejected
  the bonus is sampled from the residual. Each emitted token is then distributed exactly as the
  target's p (after temperature / top-k / top-p), for any q, provided each child really was
  drawn from its q and whether it is verified did not depend on which token it is (a node's
  number of draws is fixed before they are drawn: ``tree.sampled_tree_paths`` for a fixed shape,
  ``tree.sampled_children`` level by level for the adaptive tree). A tree without ``draft_q``
  proposes deterministically: q is one-hot at x, so x is accepted with probability p(x) and a
  rejection zeroes p(x). A child whose q(x) underflowed to 0 in fp32 (drawn after a sure draft's
  only token with mass) is skipped: q without the earlier draws has no mass left to compare with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .tree import Tree


def target_probs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """[..., V] logits -> probabilities at ``temperature`` with top-k then top-p applied (fp32).

    top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p``."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_token(probs: Tensor, generator: torch.Generator | None) -> int:
    """One token drawn from probs [V] (non-negative, any positive sum) by inverting its cumulative sum.

    ``torch.multinomial`` takes ~1 ms for one draw from a 49k vocabulary on a CPU, a seventh of a
    decode step; a float64 cumulative sum and a binary search take ~0.15 ms. A token of zero
    probability is never drawn: the search lands where the sum rises."""
    cdf = probs.double().cumsum(0)  # [V]
    x = torch.rand((), generator=generator, dtype=torch.float64, device=probs.device) * cdf[-1]
    i = int(torch.searchsorted(cdf, x, right=True))
    return i if i < probs.shape[0] else int(probs.nonzero().max())  # x rounded up to the total


def greedy_accept(tree: Tree, target_logits: Tensor) -> tuple[Tensor, int]:
    """Walk down from the root while a child's token is the target's argmax at its node.

    target_logits: [N, V]. Returns (path [a + 1] node indices with the root first, bonus = the
    argmax at the last accepted node). Siblings carry distinct tokens (they are one parent's
    top-k), so the accepted path is unique; argmax is taken only on the a + 1 rows on it — on a
    CPU a [16, 49k] argmax costs more than the rest of acceptance together."""
    kids = _children(tree.parents.tolist())
    tokens = tree.tokens.tolist()
    node, path = 0, [0]
    while True:
        best = int(target_logits[node].argmax())
        node = next((c for c in kids[node] if tokens[c] == best), -1)
        if node < 0:
            return torch.tensor(path, device=tree.tokens.device), best
        path.append(node)


def _children(parents: list[int]) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents):
        if p >= 0:
            kids[p].append(i)  # index order = draft-rank order among siblings
    return kids


def sample_accept(tree: Tree, probs: Tensor, generator: torch.Generator | None) -> tuple[Tensor, int]:
    """Multi-candidate rejection sampling down the tree.

    probs: [N, V] target distributions (after temperature / top-k / top-p) at each node.
    Returns (path [a + 1] with the root first, bonus token)."""
    kids = _children(tree.parents.tolist())
    tokens = tree.tokens.tolist()
    node, path = 0, [0]
    while True:
        p = probs[node]
        q = _proposal(tree, node, p) if kids[node] else None  # [V]
        accepted = None
        for c in kids[node]:
            x = tokens[c]
            u = torch.rand((), generator=generator, device=p.device)
            if q is None:  # deterministic child: q is one-hot at x
                if bool(u < p[x]):
                    accepted = c
                    break
                residual = p.clone()
                residual[x] = 0.0
            else:
                if not bool(q[x] > 0):  # drawn where q underflowed to 0: min(1, p / q) is unknown.
                    continue  # Skipping it caps the draws at q's support, which depends on q alone.
                if bool(u * q[x] < p[x]):  # u < p(x) / q(x), without dividing by a tiny q(x)
                    accepted = c
                    break
                residual = (p - q).clamp(min=0.0)
                q = q.clone()
                q[x] = 0.0
                mass = q.sum()
                q = q / mass if bool(mass > 0) else q
            total = residual.sum()
            if not bool(total > 0):  # all mass rejected: reachable only through fp rounding
                p = probs[node]
                break
            p = residual / total
        if accepted is None:  # every child rejected (or a leaf): bonus from the residual
            bonus = sample_token(p, generator)
            return torch.tensor(path, device=tree.tokens.device), bonus
        node = accepted
        path.append(node)


def _proposal(tree: Tree, node: int, like: Tensor) -> Tensor | None:
    """[V] the draft distribution ``node``'s children were drawn from, on the target's vocabulary
    (None for deterministic children)."""
    if tree.draft_q is None:
        return None
    row = tree.draft_q[node].to(like.dtype)  # [Vq]; the caller copies before changing it
    if tree.q_ids is None:
        return row
    return torch.zeros_like(like).index_copy_(0, tree.q_ids, row)
