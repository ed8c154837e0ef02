"""Prompt lookup: a draft chain copied from the text so far, for the cost-aware tree to weigh.

Where the last few tokens of the context (prompt + output) occurred before, the tokens that followed
them then are a guess at what follows now. Small models repeat themselves and answers quote their
prompts, so such a guess is often right for several tokens, and it costs no draft step. Each round of
a top-k tree (T <= ``TreeConfig.draw_above``) the engine asks a ``PromptLookup`` for the continuation
of the longest suffix, of 2 to ``NGRAM_MAX`` tokens, that occurred earlier; the drafter merges it into
the EAGLE-2 candidates as a chain from the root (``tree.merge_chain``), and the cost rule verifies as
much of it as pays, as for any draft. Output is unchanged: every drafted token, whoever proposed it,
is verified.

The chain's tokens need probabilities for that rule. ``PromptLookup`` learns them per generation, by
the length of the suffix matched and the token's place in the chain: after each round it counts how
many of the chain's tokens the target's own tokens confirmed (the accepted tokens and the bonus are
the target's continuation, greedy or sampled, so every chain token up to the first miss is checked,
verified in the tree or not).
Nothing here knows the tree or the engine's loop.
"""

from __future__ import annotations

import math

NGRAM_MIN, NGRAM_MAX = 2, 4  # suffix lengths looked up, longest first
# Prior rate at which the j-th copied token is right given that the ones before it were, by suffix
# length n and j, and its weight in pseudo-counts. Measured on 1,500 answers of the default model's
# training corpus (first 128 tokens each): a copy that has been right grows likelier to stay right.
# The generation's own rounds soon outweigh it.
_PRIOR = {2: (0.53, 0.65, 0.71, 0.75, 0.79, 0.80, 0.83, 0.87),
          3: (0.64, 0.71, 0.75, 0.79, 0.80, 0.84, 0.87, 0.87),
          4: (0.85, 0.88, 0.90, 0.91, 0.92, 0.93, 0.93, 0.93)}
_PRIOR_WEIGHT = 4.0


class PromptLookup:
    """The n-gram index of one generation's context and the learned accuracy of its copies."""

    def __init__(self, context: list[int], max_tokens: int):
        """context: the prompt's token ids (and anything emitted so far); max_tokens: the longest
        chain proposed (0: none)."""
        self.max_tokens = max_tokens
        self.tokens: list[int] = []
        # n-gram -> index of the token that followed its latest occurrence that has a follower
        self.follows: dict[tuple[int, ...], int] = {}
        self.tried = {n: [_PRIOR_WEIGHT] * len(r) for n, r in _PRIOR.items()}  # by suffix length, then j
        self.right = {n: [x * _PRIOR_WEIGHT for x in r] for n, r in _PRIOR.items()}
        self.extend(context)

    def extend(self, new: list[int]) -> None:
        """Append emitted tokens. An n-gram is indexed once a token follows it, so the context's own
        last tokens never match themselves."""
        toks = self.tokens
        for t in new:
            end = len(toks)  # index t takes
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if end >= n:
                    self.follows[tuple(toks[end - n:end])] = end
            toks.append(t)

    def propose(self, limit: int) -> tuple[list[int], list[float], int]:
        """(chain tokens, per-token log-probabilities, suffix length matched) continuing the context;
        empty when no suffix of NGRAM_MIN or more tokens occurred before. At most ``limit`` tokens."""
        toks, n_max = self.tokens, min(NGRAM_MAX, len(self.tokens))
        limit = min(limit, self.max_tokens)
        if limit < 1:
            return [], [], 0
        for n in range(n_max, NGRAM_MIN - 1, -1):
            start = self.follows.get(tuple(toks[-n:]))
            if start is not None:
                chain = toks[start:start + limit]
                right, tried, last = self.right[n], self.tried[n], len(self.tried[n]) - 1
                lps = [math.log(max(right[min(j, last)] / tried[min(j, last)], 1e-6)) for j in range(len(chain))]
                return chain, lps, n
        return [], [], 0

    def update(self, chain: list[int], n: int, target_tokens: list[int]) -> None:
        """Count one round: ``target_tokens`` are the round's accepted tokens and its bonus (the target's
        continuation); the chain's tokens up to its first miss among them were checked."""
        if not chain:
            return
        k = 0
        while k < min(len(chain), len(target_tokens)) and chain[k] == target_tokens[k]:
            k += 1
        checked = min(len(chain), len(target_tokens), k + 1)
        tried, right, last = self.tried[n], self.right[n], len(self.tried[n]) - 1
        for j in range(checked):
            tried[min(j, last)] += 1
            right[min(j, last)] += j < k


def copy_hits(tokens: list[int], start: int) -> list[bool]:
    """For each index j of ``tokens``: whether prompt lookup, given ``tokens[:j + 1]`` as its context,
    proposes ``tokens[j + 1]`` as the first token of its chain. False before ``start - 1`` (the copy
    is judged on the tokens from ``start`` on) and at the last index (nothing follows). The trainer
    weighs these positions: in the engine's tree the lookup chain already proposes them."""
    hits = [False] * len(tokens)
    if start < 1 or start >= len(tokens):
        return hits
    lk = PromptLookup(tokens[:start], max_tokens=1)
    for j in range(start, len(tokens)):
        chain, _, _ = lk.propose(1)
        hits[j - 1] = bool(chain) and chain[0] == tokens[j]
        lk.extend([tokens[j]])
    return hits
