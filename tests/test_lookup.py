"""Prompt lookup: the n-gram index, its learned rates and the chain's merge into the candidates
(greedy output with it: test_engine.py)."""

import math

import pytest
import torch

from eagle2.lookup import NGRAM_MAX, PromptLookup, copy_hits
from eagle2.tree import merge_chain, rerank


def test_the_longest_earlier_suffix_is_continued_and_never_itself():
    lk = PromptLookup([5, 6, 7, 8, 9, 5, 6, 7], max_tokens=8)
    chain, lps, n = lk.propose(8)
    assert n == 3 and chain == [8, 9, 5, 6, 7]  # "5 6 7" occurred before, followed by 8 9 ...
    assert all(lp <= 0 for lp in lps) and len(lps) == len(chain)
    assert PromptLookup([1, 2, 3, 4], max_tokens=8).propose(8) == ([], [], 0)  # nothing repeats
    assert PromptLookup([1, 2, 1, 2], max_tokens=8).propose(3)[0] == [1, 2]  # the latest earlier occurrence
    assert lk.propose(2)[0] == [8, 9] and PromptLookup([5, 6, 5, 6], max_tokens=0).propose(8)[0] == []
    lk.extend([8, 9, 1])
    assert lk.propose(8) == ([], [], 0)  # "9 1" and "8 9 1" never occurred before
    chain, _, n = PromptLookup([1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 5], max_tokens=8).propose(8)
    assert n == NGRAM_MAX and chain[0] == 9  # a longer repeat is found by its last NGRAM_MAX tokens


def test_copy_hits_mark_where_lookup_proposes_the_next_token():
    """copy_hits(tokens, start)[j]: lookup over tokens[:j + 1] proposes tokens[j + 1]; judged from start on."""
    t = [1, 2, 3, 4, 9, 1, 2, 3, 4, 5, 1, 2, 3]
    hits = copy_hits(t, 5)
    assert [j for j, h in enumerate(hits) if h] == [6, 7, 11]  # (1,2)->3, (1,2,3)->4, then (1,2)->3 again
    assert not hits[8]  # (1,2,3,4) was followed by 9, not 5
    for j in range(6, len(t) - 1):  # the engine's lookup agrees position by position
        chain, _, _ = PromptLookup(t[: j + 1], max_tokens=1).propose(1)
        assert hits[j] == (bool(chain) and chain[0] == t[j + 1])
    assert copy_hits(t, 0) == copy_hits(t, len(t)) == [False] * len(t)


def test_rates_follow_what_the_target_confirmed():
    lk = PromptLookup([5, 6, 7, 8, 9, 5, 6, 7], max_tokens=8)
    chain, before, n = lk.propose(8)
    for _ in range(30):  # the target keeps confirming the first two copied tokens, then disagrees
        lk.update(chain, n, [chain[0], chain[1], 99])
    _, after, _ = lk.propose(8)
    assert after[0] > before[0] and after[1] > before[1]  # confirmed: likelier
    assert math.exp(after[2]) < 0.2 < math.exp(before[2])  # refuted every time: unlikely
    assert after[3:] == before[3:]  # never checked: unchanged


def test_merge_follows_existing_candidates_and_keeps_the_tree_connected():
    # root children 10 (value log .6) and 11; 10's child 20
    tokens = torch.tensor([10, 11, 20])
    parents = torch.tensor([-1, -1, 0])
    values = torch.log(torch.tensor([0.6, 0.3, 0.3]))
    logp = values.clone()
    logp[2] = math.log(0.5)
    chain, chain_lp = [10, 21, 22], [math.log(0.9)] * 3
    tok, par, val, lp = merge_chain(tokens, parents, values, logp, chain, chain_lp)
    assert tok.tolist() == [10, 11, 20, 21, 22] and par.tolist() == [-1, -1, 0, 0, 3]
    assert val[0].exp() == pytest.approx(0.9)  # the chain rates 10 higher than the draft did
    assert val[3].exp() == pytest.approx(0.81) and val[4].exp() == pytest.approx(0.729)
    assert all(val[i] <= val[p] for i, p in enumerate(par.tolist()) if p >= 0)
    for keep in range(1, 6):  # every prefix of the rerank order is a connected tree
        tree = rerank(torch.tensor(1), tok, par, val, lp, keep)
        assert tree.size == keep + 1 and all(0 <= p < i for i, p in enumerate(tree.parents.tolist()) if i)
