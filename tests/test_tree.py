"""Tree functions on hand-drawn trees: masks, depths, positions, retrieve indices, rerank ties."""

import pytest
import torch

from eagle2.tree import (ancestor_mask, build_tree, expand, rerank, select_frontier, static_tree_parents,
                         static_tree_paths)


def t(x):
    return torch.tensor(x)


def test_worked_example_from_the_docstring():
    # r -> a, b ; a -> c
    tree = build_tree(t([10, 11, 12, 13]), t([-1, 0, 0, 1]))
    assert tree.depths.tolist() == [0, 1, 1, 2]
    assert (7 + tree.depths).tolist() == [7, 8, 8, 9]
    assert tree.retrieve.tolist() == [[0, 2, -1], [0, 1, 3]] or tree.retrieve.tolist() == [[0, 1, 3], [0, 2, -1]]
    assert tree.mask.int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [1, 1, 0, 1],
    ]


def test_deeper_tree_mask_and_paths():
    #        0
    #      / | \
    #     1  2  3
    #    / \     \
    #   4   5     6
    #   |
    #   7
    parents = t([-1, 0, 0, 0, 1, 1, 3, 4])
    tree = build_tree(torch.arange(8) + 100, parents)
    assert tree.depths.tolist() == [0, 1, 1, 1, 2, 2, 2, 3]
    paths = sorted(tree.retrieve.tolist())
    assert paths == [[0, 1, 4, 7], [0, 1, 5, -1], [0, 2, -1, -1], [0, 3, 6, -1]]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for i in range(8):
        j = i
        while j >= 0:
            expected[i, j] = True
            j = int(parents[j])
    assert torch.equal(tree.mask, expected)
    assert torch.equal(ancestor_mask(parents), expected)


def test_build_tree_rejects_child_before_parent():
    import pytest

    with pytest.raises(ValueError):
        build_tree(t([1, 2, 3]), t([-1, 2, 0]))


def test_expand_and_frontier():
    logp = torch.log_softmax(t([[4.0, 3.0, 1.0, 0.0], [0.0, 0.0, 5.0, 1.0]]), -1)
    tok, lp, val = expand(t([0.0, -1.0]), logp, 2)
    assert tok.tolist() == [[0, 1], [2, 3]]
    assert torch.allclose(val, t([0.0, -1.0])[:, None] + lp)
    assert (val <= t([0.0, -1.0])[:, None]).all()  # a child's value never exceeds its parent's
    sel = select_frontier(val, 2)
    assert sorted(sel.tolist()) == sorted(val.flatten().topk(2).indices.tolist())


def test_rerank_keeps_parents_on_ties():
    # Candidates in generation order; parents index candidates (-1 = root). Every value is 0:
    # all tie, and a naive top-k could keep a child without its parent.
    tokens = t([5, 6, 7, 8, 9])
    parents = t([-1, -1, 0, 2, 1])
    values = torch.zeros(5)
    for keep in range(1, 6):
        tree = rerank(t(1), tokens, parents, values, torch.zeros(5), keep)
        assert tree.size == keep + 1
        par = tree.parents.tolist()
        assert par[0] == -1 and all(0 <= p < i for i, p in enumerate(par) if i)


def test_rerank_ties_inside_descending_values():
    # child 3 ties with its parent 2 exactly (log p = 0); candidate 4 is better than both
    tokens = t([5, 6, 7, 8, 9])
    parents = t([-1, -1, 0, 2, 1])
    values = t([-0.1, -0.5, -0.7, -0.7, -0.6])
    tree = rerank(t(1), tokens, parents, values, torch.zeros(5), 4)
    kept_tokens = tree.tokens.tolist()[1:]
    assert kept_tokens == [5, 6, 7, 9]  # 8 ties with its parent 7 but 7 ranks first; budget ends
    assert tree.parents.tolist() == [-1, 0, 0, 1, 2]


def test_rerank_orders_parents_first_and_selects_best():
    tokens = t([10, 11, 12, 13, 14, 15])
    parents = t([-1, -1, 0, 0, 1, 2])
    values = t([-0.1, -2.0, -0.3, -3.0, -2.5, -0.4])
    tree = rerank(t(0), tokens, parents, values, values, 3)
    assert tree.tokens.tolist() == [0, 10, 12, 15]
    assert tree.parents.tolist() == [-1, 0, 1, 2]
    assert tree.depths.tolist() == [0, 1, 2, 3]


def test_static_tree_paths_are_connected_and_bounded():
    for total, depth, k in [(16, 5, 4), (8, 3, 2), (60, 6, 10), (2, 1, 1)]:
        paths = static_tree_paths(total, depth, k)
        assert len(paths) == total - 1
        assert all(len(p) <= depth and max(p) < k for p in paths)
        parents = static_tree_parents(paths)
        assert all(0 <= p <= i for i, p in enumerate(parents))
        assert (0,) in paths


def test_chain_is_a_single_path():
    tree = build_tree(t([1, 2, 3, 4]), t([-1, 0, 1, 2]))
    assert tree.retrieve.tolist() == [[0, 1, 2, 3]]
    assert torch.equal(tree.mask, torch.ones(4, 4, dtype=torch.bool).tril())


def test_best_size_maximises_expected_tokens_per_ms():
    from eagle2.tree import best_size

    probs = torch.tensor([0.9, 0.5, 0.1])
    flat = torch.tensor([0.0, 10.0, 10.0, 10.0, 10.0])  # verifying 1..4 nodes costs the same: keep all
    assert best_size(probs, flat, 0.0)[0] == 3
    steep = torch.tensor([0.0, 10.0, 20.0, 30.0, 40.0])  # each node costs a whole forward: keep none
    j, expected, rate = best_size(probs, steep, 0.0)
    assert (j, expected) == (0, 1.0) and abs(rate - 0.1) < 1e-6
    mid = torch.tensor([0.0, 10.0, 11.0, 12.0, 20.0])  # the third draft (p = 0.1) costs 8 ms more: stop at 2
    j, expected, _ = best_size(probs, mid, 0.0)
    assert j == 2 and abs(expected - 2.4) < 1e-6


def test_a_shared_forward_keeps_fewer_drafts():
    """Verifying beside other decodes in one forward splits the first row's cost (the weights' reading)
    among them; every further row costs what it costs alone, so a draft must be likelier to pay."""
    from eagle2.tree import Budget, best_size

    alone = Budget(torch.tensor([0.0, 6.0, 7.0, 8.0, 9.0]), level_ms=0.5, fixed_ms=1.0)
    four = alone.shared_by(4)
    assert torch.allclose(four.verify_ms, torch.tensor([0.0, 1.5, 2.5, 3.5, 4.5]))
    assert alone.shared_by(1) is alone and four.level_ms == 0.5 and four.fixed_ms == 1.0
    probs = torch.tensor([0.8, 0.4, 0.25])
    assert best_size(probs, alone.verify_ms, 1.0)[0] == 3  # alone every draft pays its 1 ms
    assert best_size(probs, four.verify_ms, 1.0)[0] == 1  # four to a forward only the likeliest does


def test_frontier_to_feed():
    from eagle2.tree import frontier_to_feed

    probs = torch.tensor([0.6, 0.1])
    cheap = torch.tensor([0.0, 10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0])  # half a ms per extra node
    assert frontier_to_feed(probs, torch.tensor([0.5]), cheap, 1.0, 1.0) == 1  # +0.5 tokens for ~1.5 ms: yes
    assert frontier_to_feed(probs, torch.tensor([0.02]), cheap, 1.0, 1.0) == 0  # +0.02 tokens: no
    assert frontier_to_feed(probs, torch.tensor([0.5]), cheap, 1.0, 20.0) == 0  # a level dearer than a round: no
    # Only the frontier nodes whose predicted child would be verified are fed: the 0.01 one cannot pay.
    assert frontier_to_feed(probs, torch.tensor([0.5, 0.4, 0.01]), cheap, 1.0, 1.0) == 2
    # With free rows every node whose child enters the best prefix is fed ...
    free = torch.tensor([0.0] + [10.0] * 8)
    assert frontier_to_feed(probs, torch.tensor([0.5, 0.4, 0.01]), free, 1.0, 1.0) == 3
    # ... and a row as dear as a level of its own leaves the marginal node out.
    assert frontier_to_feed(probs, torch.tensor([0.5, 0.4, 0.01]), free, 1.0, 1.0, row_ms=0.2) == 2
    assert frontier_to_feed(probs, torch.tensor([0.5, 0.4, 0.01]), free, 1.0, 1.0, row_ms=8.0) == 0


def test_path_probs():
    from eagle2.tree import path_probs

    t = build_tree(torch.tensor([5, 6, 7, 8]), torch.tensor([-1, 0, 0, 1]),
                   torch.tensor([1.0, 0.5, 0.25, 0.5]).log())
    assert torch.allclose(path_probs(t), torch.tensor([1.0, 0.5, 0.25, 0.25]))


def test_sampled_tree_paths_follow_the_acceptance_rates():
    """Reach = parent's reach x (1 - earlier siblings' rates) x own rate; parents and earlier
    siblings come first; depth and rank bounds hold."""
    from eagle2.tree import sampled_tree_paths

    accept = torch.tensor([[0.5, 0.4], [0.3, 0.2]])  # depth 1, then depth >= 2
    paths, probs = sampled_tree_paths(accept, 6, 3, 2)
    reach = dict(zip(paths, probs))
    assert reach[(0,)] == pytest.approx(0.5) and reach[(1,)] == pytest.approx(0.5 * 0.4)
    assert reach[(0, 0)] == pytest.approx(0.5 * 0.3)
    assert paths[:3] == [(0,), (1,), (0, 0)]
    for i, path in enumerate(paths):
        assert len(path) <= 3 and max(path) < 2
        before = set(paths[:i])
        assert len(path) == 1 or path[:-1] in before
        assert path[-1] == 0 or path[:-1] + (path[-1] - 1,) in before
    assert len(sampled_tree_paths(accept, 100, 2, 2)[0]) == 2 + 2 * 2  # the whole depth-2 binary tree


def test_sampled_size_pays_for_levels_and_rows():
    from eagle2.tree import Budget, sampled_size

    flat = Budget(torch.tensor([0.0, 10, 10, 10, 10, 10]), level_ms=1.0, fixed_ms=2.0)
    assert sampled_size([0.5, 0.3, 0.2, 0.1], [1, 2, 3, 1], flat) == 4  # free rows: all, levels are cheap
    steep = Budget(torch.tensor([0.0, 10, 20, 30, 40, 50]), level_ms=1.0, fixed_ms=2.0)
    assert sampled_size([0.5, 0.3, 0.2, 0.1], [1, 2, 3, 1], steep) == 0  # a row costs a whole vanilla step
    dear_levels = Budget(torch.tensor([0.0, 10, 10, 10, 10, 10]), level_ms=20.0, fixed_ms=2.0)
    assert sampled_size([0.5, 0.3, 0.2, 0.1], [1, 2, 3, 1], dear_levels) == 1


def test_sampled_children_draw_where_the_draft_is_sure_and_verification_pays():
    """A sure node (rates 0.9 / 0.5) gets draws before a flat one (0.2 / 0.1), each node's in rank
    order; free verification takes every draw up to the node cap; a dear one takes none."""
    from eagle2.tree import sampled_children

    rates = [[0.9, 0.5], [0.2, 0.1]]
    cheap = [0.0] + [10.0 + 0.5 * n for n in range(1, 8)]  # verify_ms by nodes, root included
    # gains 0.9, 0.2, then the flat node's second draw (0.8 x 0.1) before the sure node's (0.1 x 0.5),
    # which no longer pays its row
    assert sampled_children([1.0, 1.0], rates, 2, 1, 1.0, 2.0, cheap) == [1, 2]
    assert sampled_children([1.0, 1.0], rates, 1, 1, 1.0, 2.0, cheap) == [1, 1]  # width 1: one draw each
    mid = [0.0] + [10.0 + 4.0 * n for n in range(1, 8)]
    assert sampled_children([1.0, 1.0], rates, 2, 1, 1.0, 2.0, mid) == [1, 0]  # only the sure draw pays
    assert sampled_children([0.1, 1.0], rates, 2, 1, 1.0, 2.0, mid) == [0, 0]  # unlikely to be reached: none
    free = [0.0] + [10.0] * 4
    assert sum(sampled_children([1.0, 1.0], rates, 2, 1, 1.0, 2.0, free)) == 3  # up to 4 nodes in all
    dear = [0.0] + [20.0 * n for n in range(1, 8)]  # a row costs more than a vanilla step
    assert sampled_children([1.0, 1.0], rates, 2, 1, 1.0, 2.0, dear) == [0, 0]


def test_sampled_feed_feeds_the_nodes_whose_children_pay_for_a_level():
    from eagle2.tree import sampled_feed

    verify = [0.0] + [10.0 + 0.5 * n for n in range(1, 12)]
    assert sampled_feed([0.8, 0.6, 0.05], 4, 2.5, 3.0, verify, level_ms=0.5) == 2
    assert sampled_feed([0.8, 0.6, 0.05], 4, 2.5, 3.0, verify, level_ms=20.0) == 0  # a level costs too much
    assert sampled_feed([], 4, 2.5, 3.0, verify, level_ms=0.5) == 0
    assert sampled_feed([0.9] * 20, 4, 2.5, 3.0, verify, level_ms=0.5) == len(verify) - 1 - 4  # the node cap


def test_sampled_reach_matches_the_best_first_paths():
    from eagle2.tree import sampled_reach, sampled_tree_paths

    accept = torch.tensor([[0.5, 0.4], [0.3, 0.2]])
    paths, probs = sampled_tree_paths(accept, 6, 3, 2)
    paths_sorted = sorted(paths, key=lambda p: (len(p), p))
    parents = [-1] + static_tree_parents(paths_sorted)
    rows = [0] + [len(p) - 1 for p in paths_sorted]  # by depth
    reach = sampled_reach(parents, rows, accept)
    want = dict(zip(paths, probs))
    assert reach[0] == 1.0
    assert reach[1:] == pytest.approx([want[p] for p in paths_sorted])


def test_chain_tree_verifies_the_chain_prefix_that_pays():
    """A lookup chain alone: its k-th node's path probability is the product of the first k
    probabilities; the kept prefix is ``best_size``'s; nothing pays -> just the root."""
    import math

    from eagle2.tree import Budget, chain_tree, path_probs

    root = torch.tensor(5)
    cheap = Budget(torch.tensor([0.0] + [10.0 + n for n in range(9)]), 0.5, 1.0)  # 1 ms a node
    logp = [math.log(0.9), math.log(0.9), math.log(0.1), math.log(0.9)]  # path 0.9, 0.81, 0.081, 0.073
    tree = chain_tree(root, ([7, 8, 9, 10], logp), cheap)
    assert tree.tokens.tolist() == [5, 7, 8] and tree.parents.tolist() == [-1, 0, 1]
    assert torch.allclose(path_probs(tree), torch.tensor([1.0, 0.9, 0.81]))
    dear = Budget(torch.tensor([0.0] + [10.0 + 20.0 * n for n in range(9)]), 0.5, 1.0)
    assert chain_tree(root, ([7, 8], logp[:2]), dear).tokens.tolist() == [5]
    assert chain_tree(root, ([], []), cheap).tokens.tolist() == [5]
