"""Acceptance rules: greedy on toy logits; sampling checked statistically against the exact
target distribution, with a negative control showing the test catches a wrong sampler."""

import pytest
import torch
from scipy.stats import chisquare

from eagle2 import verify
from eagle2.tree import build_tree
from eagle2.verify import greedy_accept, sample_accept, target_probs

from conftest import cost_model, lookup_chains, make_generator, make_tiny_model


def onehot_logits(n, v, argmax):
    logits = torch.zeros(n, v)
    logits[torch.arange(n), torch.tensor(argmax)] = 5.0
    return logits


def test_sample_token_draws_from_p(monkeypatch):
    """The inverse-CDF draw follows p (unnormalized), never picks a zero, and survives a draw at the top."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 2.0, 0.0, 1.0, 5.0, 0.0, 0.5, 1.5, 0.0])
    counts = torch.zeros(len(p))
    for _ in range(20000):
        counts[verify.sample_token(p, g)] += 1
    assert counts[p == 0].sum() == 0
    keep = p > 0
    assert chisquare(counts[keep].numpy(), (p[keep] / p.sum() * counts.sum()).numpy()).pvalue > 1e-3
    # a uniform draw as high as a double allows, times a total that rounds it up, still lands on a token of p
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(1.0 - 2.0 ** -53, dtype=torch.float64))
    assert verify.sample_token(torch.tensor([0.3, 0.7, 0.0, 0.0]), None) == 1


def test_greedy_accepts_longest_matching_path():
    # r -> a(3), b(4); a -> c(5); b -> d(6)
    tree = build_tree(torch.tensor([1, 3, 4, 5, 6]), torch.tensor([-1, 0, 0, 1, 2]))
    # target argmax: after r -> 4 (b), after b -> 6 (d), after d -> 7 (bonus)
    logits = onehot_logits(5, 8, [4, 0, 6, 0, 7])
    path, bonus = greedy_accept(tree, logits)
    assert path.tolist() == [0, 2, 4] and bonus == 7


def test_greedy_rejects_everything():
    tree = build_tree(torch.tensor([1, 3, 4]), torch.tensor([-1, 0, 0]))
    path, bonus = greedy_accept(tree, onehot_logits(3, 8, [2, 0, 0]))
    assert path.tolist() == [0] and bonus == 2


def test_greedy_walk_equals_longest_matching_prefix():
    """On random trees (distinct sibling tokens, as drafting makes them) the walk finds the
    longest root -> leaf prefix whose tokens are the target's argmax at their parents."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n, v = int(torch.randint(2, 14, (1,), generator=g)), 6
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
        tokens, used = [0], {}
        for i in range(1, n):  # children of one parent take distinct tokens
            free = [t for t in range(v) if t not in used.setdefault(parents[i], set())]
            if not free:
                parents, tokens = parents[:i], tokens[:i]
                break
            tokens.append(free[int(torch.randint(0, len(free), (1,), generator=g))])
            used[parents[i]].add(tokens[-1])
        tree = build_tree(torch.tensor(tokens), torch.tensor(parents))
        logits = torch.randn(len(tokens), v, generator=g)
        logits[:, :3] += 2.0  # make matches common
        argmax = logits.argmax(-1)
        best = [0]
        for leaf in range(len(tokens)):  # brute force over every node's root path
            chain = [leaf]
            while parents[chain[-1]] >= 0:
                chain.append(parents[chain[-1]])
            chain.reverse()
            if all(tokens[c] == int(argmax[p]) for p, c in zip(chain, chain[1:])) and len(chain) > len(best):
                best = chain
        path, bonus = greedy_accept(tree, logits)
        assert path.tolist() == best and bonus == int(argmax[best[-1]])


def test_target_probs_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(target_probs(logits, 1.0), torch.tensor([[0.5, 0.3, 0.15, 0.05]]), atol=1e-6)
    p = target_probs(logits, 1.0, top_k=2)
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]), atol=1e-6)
    p = target_probs(logits, 1.0, top_p=0.7)  # smallest set with mass >= 0.7: {0.5, 0.3}
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]), atol=1e-6)
    p = target_probs(logits, 1.0, top_p=0.85)
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95, atol=1e-6)


def test_sample_accept_on_a_fixed_tree_matches_p():
    # One level, three candidates; the emitted first token must be distributed as p.
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    tree = build_tree(torch.tensor([0, 1, 3, 2]), torch.tensor([-1, 0, 0, 0]))
    probs = torch.stack([p, p, p, p])  # children's own rows don't matter for the first token
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(4)
    for _ in range(n):
        path, bonus = sample_accept(tree, probs, g)
        first = int(tree.tokens[path[1]]) if len(path) > 1 else bonus
        counts[first] += 1
    assert chisquare(counts.numpy(), (p * n).numpy()).pvalue > 1e-3


def _sampled_tree(q, n_children, g):
    """A one-level tree whose children are drawn from q without replacement (Gumbel top-k)."""
    from dataclasses import replace

    from eagle2.draft import _gumbel_top

    kids = _gumbel_top(q.log()[None], n_children, g)[0]
    tree = build_tree(torch.cat([torch.tensor([0]), kids]), torch.tensor([-1] + [0] * n_children))
    rows = torch.zeros(n_children + 1, q.shape[0])
    rows[0] = q
    return replace(tree, draft_q=rows)


@pytest.mark.parametrize("n_children", [1, 2, 3])
def test_sample_accept_with_sampled_children_matches_p(n_children):
    """Children drawn from q (far from p), accepted by min(1, p / q) with the residual: the first
    emitted token is distributed as p."""
    p = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    q = torch.tensor([0.05, 0.15, 0.2, 0.3, 0.3])
    probs = p.expand(n_children + 1, -1)
    g = torch.Generator().manual_seed(1)
    n, counts = 20000, torch.zeros(5)
    for _ in range(n):
        tree = _sampled_tree(q, n_children, g)
        path, bonus = sample_accept(tree, probs, g)
        counts[int(tree.tokens[path[1]]) if len(path) > 1 else bonus] += 1
    assert counts[4] == 0
    assert chisquare(counts[:4].numpy(), (p[:4] * n).numpy()).pvalue > 1e-3


def test_a_draw_whose_probability_underflowed_is_skipped_not_accepted():
    """A sure draft (log-probs 0, -200, -200, -200: q is one-hot in fp32) whose later draws come from
    what underflowed to zero. Once the first draw is rejected, q without it has no mass left, so
    min(1, p / q) cannot be computed for the later draws; taking q as 0 would accept any of them the
    target allows (token 2 half the time instead of 0.1). They are skipped, and the bonus comes
    from the residual: the first token is distributed as p."""
    from dataclasses import replace

    from eagle2.draft import _gumbel_top

    logq = torch.tensor([0.0, -200.0, -200.0, -200.0])
    p = torch.tensor([0.5, 0.4, 0.1, 0.0])
    g = torch.Generator().manual_seed(2)
    n, counts = 8000, torch.zeros(4)
    for _ in range(n):
        kids = _gumbel_top(logq[None], 3, g)[0]
        tree = build_tree(torch.cat([torch.tensor([0]), kids]), torch.tensor([-1, 0, 0, 0]))
        rows = torch.zeros(4, 4)
        rows[0] = logq.softmax(-1)
        path, bonus = sample_accept(replace(tree, draft_q=rows), p.expand(4, -1), g)
        counts[int(tree.tokens[path[1]]) if len(path) > 1 else bonus] += 1
    assert counts[3] == 0
    assert chisquare(counts[:3].numpy(), (p[:3] * n).numpy()).pvalue > 1e-3


def test_a_sampled_child_from_q_equal_p_is_always_accepted():
    """Why drafts are sampled at T > 0: with q = p uniform over 4 tokens a drawn child is accepted
    every time, where the deterministic rule accepts a fixed child a quarter of the time."""
    p = torch.full((4,), 0.25)
    g = torch.Generator().manual_seed(0)
    sampled = sum(len(sample_accept(_sampled_tree(p, 1, g), p.expand(2, -1), g)[0]) - 1 for _ in range(400))
    fixed = build_tree(torch.tensor([0, 2]), torch.tensor([-1, 0]))
    deterministic = sum(len(sample_accept(fixed, p.expand(2, -1), g)[0]) - 1 for _ in range(400))
    assert sampled == 400 and 50 < deterministic < 150


# ---- end to end through the engine ------------------------------------------------------------

V = 6
PROMPT = [1, 4, 2, 5]


def _exact_joint(model, prompt, n_tokens, temperature, top_k, top_p):
    """Exact probability of every sequence of the first n_tokens: {token tuple: probability}."""
    joint = {(): 1.0}
    for _ in range(n_tokens):
        seqs = [s for s, p in joint.items() if p > 0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(s) for s in seqs])).logits[:, -1]
        probs = target_probs(logits, temperature, top_k, top_p)  # [S, V]
        joint = {s + (t,): joint[s] * float(probs[i, t]) for i, s in enumerate(seqs)
                 for t in probs[i].nonzero().flatten().tolist()}
    return joint


def _sample_counts(gen, prompt, n, temperature, top_k, top_p, n_tokens=3, generate_tokens=5, shape=None):
    """Counts of the first ``n_tokens`` of ``n`` seeded generations of ``generate_tokens`` tokens
    each: generating more than is scored leaves room for trees deeper than one level in the
    rounds that produce the scored tokens."""
    counts, accepted, depths = {}, 0, []
    tree = dict(total_tokens=16, depth=3, tree_top_k=3) if shape is None else shape  # {}: the dynamic tree
    for seed in range(n):
        r = gen.generate(prompt, max_new_tokens=generate_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed, **tree)
        key = tuple(r.token_ids[:n_tokens])
        counts[key] = counts.get(key, 0) + 1
        accepted += sum(r.stats.accept_lengths)
        depths.append(max(r.stats.tree_depths, default=0))
    assert max(depths) >= 3, f"trees never reached depth 3: {sorted(set(depths))}"
    return counts, accepted


def _chi2_pvalue(counts, joint):
    """Chi-square of observed sequence counts against the exact joint; cells expecting < 5 pooled."""
    assert set(counts) <= set(joint), f"sampled a sequence the target gives probability 0: {set(counts) - set(joint)}"
    n = sum(counts.values())
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for seq, p in joint.items():
        if p * n >= 5:
            obs.append(counts.get(seq, 0))
            exp.append(p * n)
        else:
            pool_o += counts.get(seq, 0)
            pool_e += p * n
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    exp = [e * sum(obs) / sum(exp) for e in exp]
    return chisquare(obs, exp).pvalue


@pytest.fixture(scope="module")
def sampling_gen():
    model = make_tiny_model("llama", vocab_size=V, seed=3)
    with torch.no_grad():  # soften: a spread-out distribution makes a strong test
        model.get_output_embeddings().weight.mul_(0.25)
    return model, make_generator(model)


N_SAMPLES = 2500


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 4, 0.9)])
def test_sampled_joint_distribution_matches_target(sampling_gen, temperature, top_k, top_p):
    model, gen = sampling_gen
    joint = _exact_joint(model, PROMPT, 3, temperature, top_k, top_p)
    counts, accepted = _sample_counts(gen, PROMPT, N_SAMPLES, temperature, top_k, top_p)
    assert accepted > N_SAMPLES // 4, "drafts were rarely accepted: the acceptance rule was barely tested"
    assert _chi2_pvalue(counts, joint) > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_cost_aware_tree_matches_target(sampling_gen, temperature):
    """The dynamic tree (free verification: it grows deep and wide) samples the target exactly too:
    at T = 1 with drawn children, at T = 0.5 (below ``TreeConfig.draw_above``) with the reranked
    top-k tree of T = 0, each child accepted with the target's probability."""
    from eagle2.api import Eagle2Generator

    model, gen = sampling_gen
    assert gen.tree.draws(1.0) and not gen.tree.draws(0.5)
    deep = Eagle2Generator(model, gen.tokenizer, gen.head, cost_model=cost_model(0.0, level_ms=0.0))
    joint = _exact_joint(model, PROMPT, 3, temperature, 0, 1.0)
    counts, accepted = _sample_counts(deep, PROMPT, N_SAMPLES, temperature, 0, 1.0, shape={})
    assert accepted > N_SAMPLES // 4
    assert _chi2_pvalue(counts, joint) > 1e-3


def _sure_above_median(monkeypatch):
    """The tiny head's draft distributions are all nearly flat (largest probability 0.167-0.172): rate
    about half of them as sure and the rest as hopeless, by a digit of their confidence, so that
    which nodes get children, and how many, depends on the tokens drawn above them. Exactness must
    hold for any rule that reads only the distribution a node draws from."""
    from eagle2.cost import SampledAcceptance

    monkeypatch.setattr(SampledAcceptance, "confidence_row", staticmethod(lambda c: 9 if int(c * 1e6) % 2 else 0))
    monkeypatch.setattr(SampledAcceptance, "CONFIDENCE_PRIOR", (0.02,) + (0.5,) * 8 + (0.95,))


def test_sampled_adaptive_tree_with_shapes_that_depend_on_the_draws_matches_target(sampling_gen, monkeypatch):
    """The adaptive tree at T > 0 decides each node's number of draws from the confidence of the
    distribution it draws from, so its shape depends on the tokens drawn above; it stays exact
    because no drawn node is dropped and no count depends on the draws it counts."""
    from eagle2.api import Eagle2Generator

    _sure_above_median(monkeypatch)
    model, gen = sampling_gen
    adaptive = Eagle2Generator(model, gen.tokenizer, gen.head, cost_model=cost_model(0.5, level_ms=0.1))
    sizes = {len(r.stats.tree_sizes) and tuple(r.stats.tree_sizes)
             for r in (adaptive.generate(PROMPT, max_new_tokens=5, temperature=1.0, seed=s) for s in range(20))}
    assert len({n for shape in sizes for n in shape}) >= 3, f"the shapes never varied: {sizes}"
    joint = _exact_joint(model, PROMPT, 3, 1.0, 0, 1.0)
    counts, accepted = _sample_counts(adaptive, PROMPT, N_SAMPLES, 1.0, 0, 1.0, shape={})
    assert accepted > N_SAMPLES // 4
    assert _chi2_pvalue(counts, joint) > 1e-3


def _prune_by_own_probability(grow):
    """A plausible bug: drop each drawn leaf whose own draft probability is below its siblings' best
    (EAGLE-2's rerank, fine at T = 0). Whether a child is verified then depends on its own token."""
    from dataclasses import replace

    from eagle2.tree import build_tree

    def pruned(self, *args):
        t = grow(self, *args)
        if t.draft_q is None:  # the root alone
            return t
        par, lp = t.parents.tolist(), t.draft_logp.tolist()
        has_kids = {p for p in par if p >= 0}
        best: dict[int, float] = {}
        for i, p in enumerate(par):
            if p >= 0:
                best[p] = max(best.get(p, -1e9), lp[i])
        keep = [i for i, p in enumerate(par) if p < 0 or i in has_kids or lp[i] >= best[p]]
        new = {old: j for j, old in enumerate(keep)}
        kept = build_tree(t.tokens[keep], torch.tensor([new[par[i]] if par[i] >= 0 else -1 for i in keep]),
                          t.draft_logp[keep])
        return replace(kept, draft_q=t.draft_q[keep], q_ids=t.q_ids)
    return pruned


def test_negative_control_catches_pruning_a_draw_by_its_own_probability(sampling_gen, monkeypatch):
    from eagle2.api import Eagle2Generator
    from eagle2.draft import Drafter

    model, gen = sampling_gen
    monkeypatch.setattr(Drafter, "_grow_sampled", _prune_by_own_probability(Drafter._grow_sampled))
    wide = Eagle2Generator(model, gen.tokenizer, gen.head, cost_model=cost_model(0.0, level_ms=0.0))
    joint = _exact_joint(model, PROMPT, 3, 1.0, 0, 1.0)
    counts, _ = _sample_counts(wide, PROMPT, N_SAMPLES, 1.0, 0, 1.0, shape={})
    assert _chi2_pvalue(counts, joint) < 1e-3


def _wrong_sample_accept(tree, probs, generator):
    """A classic bug: on rejection, keep the original p instead of the residual norm(max(p - q, 0))."""
    kids = verify._children(tree.parents.tolist())
    tokens = tree.tokens.tolist()
    node, path = 0, [0]
    while True:
        p = probs[node]
        q = verify._proposal(tree, node, p) if kids[node] else None
        nxt = None
        for c in kids[node]:
            x = tokens[c]
            qx = 1.0 if q is None else float(q[x])
            if bool(torch.rand((), generator=generator) * qx < p[x]):
                nxt = c
                break
        if nxt is None:
            return torch.tensor(path), int(torch.multinomial(p, 1, generator=generator))
        node = nxt
        path.append(node)


def test_negative_control_catches_a_wrong_sampler(sampling_gen, monkeypatch):
    import eagle2.engine as engine

    model, gen = sampling_gen
    monkeypatch.setattr(engine, "sample_accept", _wrong_sample_accept)
    joint = _exact_joint(model, PROMPT, 3, 1.0, 0, 1.0)
    counts, _ = _sample_counts(gen, PROMPT, 2 * N_SAMPLES, 1.0, 0, 1.0)  # the bias is small: more samples show it
    assert _chi2_pvalue(counts, joint) < 1e-3


REPEATS = [4, 0, 4, 1, 4, 2, 4, 3, 4, 4, 5, 4]  # "4 t" occurred for every t: lookup has a chain after any root


def _lookup_counts(sampling_gen, monkeypatch, n, temperature, top_k, top_p):
    """Counts of the cost-aware tree (free verification) at T <= draw_above on REPEATS, where every first
    round merges a prompt-lookup chain into the top-k candidates."""
    from eagle2.api import Eagle2Generator

    model, gen = sampling_gen
    chains = lookup_chains(monkeypatch)
    deep = Eagle2Generator(model, gen.tokenizer, gen.head, cost_model=cost_model(0.0, level_ms=0.0))
    assert not deep.tree.draws(temperature)
    counts, accepted = _sample_counts(deep, REPEATS, n, temperature, top_k, top_p, shape={})
    assert sum(1 for c in chains if c) >= n, "prompt lookup proposed too few chains: the merge was barely tested"
    return _exact_joint(model, REPEATS, 3, temperature, top_k, top_p), counts, accepted


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 0, 1.0), (0.7, 3, 0.9)])
def test_sampled_top_k_tree_with_lookup_chains_matches_target(sampling_gen, monkeypatch, temperature, top_k, top_p):
    """At 0 < T <= draw_above the cost-aware tree is the top-k tree with a prompt-lookup chain merged in:
    deterministic children, each accepted with the target's probability. Exact with top-k / top-p too."""
    joint, counts, accepted = _lookup_counts(sampling_gen, monkeypatch, N_SAMPLES, temperature, top_k, top_p)
    assert accepted > N_SAMPLES // 4
    assert _chi2_pvalue(counts, joint) > 1e-3


def test_negative_control_catches_a_wrong_sampler_on_lookup_chains(sampling_gen, monkeypatch):
    import eagle2.engine as engine

    monkeypatch.setattr(engine, "sample_accept", _wrong_sample_accept)
    joint, counts, _ = _lookup_counts(sampling_gen, monkeypatch, N_SAMPLES, 0.5, 0, 1.0)
    assert _chi2_pvalue(counts, joint) < 1e-3


DRAFT_VOCAB = [2, 0, 5, 1]  # FR-Spec: the drafter proposes only these, in this column order


def _reduced_vocab_generator(sampling_gen, adaptive: bool):
    """The sampling model with a copy of its head drafting over DRAFT_VOCAB: drawn trees carry q over
    those four columns (``Tree.q_ids``); ``adaptive``: the cost-aware tree, under free verification."""
    import copy

    from eagle2.api import Eagle2Generator

    model, gen = sampling_gen
    head = copy.deepcopy(gen.head)
    head.draft_vocab = torch.tensor(DRAFT_VOCAB)
    kw = dict(cost_model=cost_model(0.0, level_ms=0.0)) if adaptive else {}
    return model, Eagle2Generator(model, gen.tokenizer, head, **kw)


def _frspec_counts(gen, adaptive, n):
    """_sample_counts at T = 1, top-p 0.9, checking that every drafted token is in DRAFT_VOCAB."""
    seen = []
    grow = gen.drafter.grow

    def spy(*a, **kw):
        tree = grow(*a, **kw)
        seen.extend(tree.tokens[1:].tolist())
        return tree

    gen.drafter.grow = spy
    counts, accepted = _sample_counts(gen, PROMPT, n, 1.0, 0, 0.9, shape={} if adaptive else None)
    assert seen and set(seen) <= set(DRAFT_VOCAB)
    return counts, accepted


@pytest.mark.parametrize("adaptive", [False, True])
def test_sampled_drafts_over_a_reduced_vocabulary_match_target(sampling_gen, adaptive):
    """Drawn children over an FR-Spec draft vocabulary (q over its columns, mapped to tokens by
    ``Tree.q_ids``) with top-p on the target: tokens the draft cannot propose come from the residual,
    and the first three tokens follow the target exactly, for the fixed and the adaptive tree."""
    model, gen = _reduced_vocab_generator(sampling_gen, adaptive)
    joint = _exact_joint(model, PROMPT, 3, 1.0, 0, 0.9)
    counts, accepted = _frspec_counts(gen, adaptive, N_SAMPLES)
    assert accepted > N_SAMPLES // 4
    assert _chi2_pvalue(counts, joint) > 1e-3


def test_negative_control_catches_q_read_without_its_token_ids(sampling_gen, monkeypatch):
    """A plausible bug: q's column j taken as token j (``q_ids`` ignored). The test above catches it."""
    def columns_as_tokens(tree, node, like):
        row = tree.draft_q[node].to(like.dtype)  # [Vq]
        return torch.zeros_like(like).index_copy_(0, torch.arange(row.shape[0]), row)

    model, gen = _reduced_vocab_generator(sampling_gen, False)
    monkeypatch.setattr(verify, "_proposal", columns_as_tokens)  # (every tree here is drawn: draft_q is set)
    joint = _exact_joint(model, PROMPT, 3, 1.0, 0, 0.9)
    counts, _ = _frspec_counts(gen, False, N_SAMPLES // 2)  # a large bias: fewer samples show it
    assert _chi2_pvalue(counts, joint) < 1e-3


@pytest.mark.slow
def test_smollm2_sampling_matches_target(smol_fp32):
    """The real model: top-k 3 keeps the support small enough to enumerate 3 tokens exactly."""
    gen = smol_fp32
    prompt = gen.encode_prompt([{"role": "user", "content": "Name a random animal."}])
    joint = _exact_joint(gen.model, prompt, 3, 1.0, 3, 1.0)
    counts, _ = _sample_counts(gen, prompt, 400, 1.0, 3, 1.0)
    assert _chi2_pvalue(counts, joint) > 1e-3
