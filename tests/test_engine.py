"""The contract: greedy eagle2 / eagle1 / chain output equals transformers generate(do_sample=False)
token for token — tiny random Llama, Qwen2, Mistral and Gemma 3 models, and SmolLM2-135M in fp32.

Trees are exercised with real acceptance (small vocabularies make random drafts hit), and with
EOS and max_new_tokens falling in the middle of a multi-token round."""

import json

import pytest
import torch

from conftest import DATA, cost_model, fit_head, lookup_chains, make_generator, make_tiny_model

FAMILIES = ["llama", "qwen2", "mistral", "gemma3"]
TREES = [dict(total_tokens=10, depth=4, tree_top_k=4), dict(total_tokens=4, depth=6, tree_top_k=2),
         dict(total_tokens=24, depth=3, tree_top_k=8)]
PROMPTS = [[1, 2, 3, 4, 5], [7] * 3, list(range(16)) * 2 + [3, 1]]  # the last one is longer than the window


def hf_greedy(model, prompt, max_new_tokens, eos=None):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = make_tiny_model(request.param, vocab_size=16)
    return request.param, model, fit_head(model)


def test_untrained_head_is_still_exact(family):
    name, model, _ = family
    gen = make_generator(model)  # freshly initialised head
    for prompt in PROMPTS:
        assert gen.generate(prompt, max_new_tokens=24).token_ids == hf_greedy(model, prompt, 24), name


@pytest.mark.parametrize("method", ["eagle2", "eagle1", "chain", "vanilla"])
def test_greedy_equals_transformers(family, method):
    name, model, head = family
    gen = make_generator(model, head=head)
    taus = []
    for prompt in PROMPTS:
        ref = hf_greedy(model, prompt, 40)
        for tree in TREES:
            r = gen.generate(prompt, max_new_tokens=40, method=method, **tree)
            assert r.token_ids == ref, f"{name} {method} {tree} prompt={prompt}"
            assert r.finish_reason == "length"
            taus.append(r.stats.mean_accept_len)
    if method != "vanilla":
        assert max(taus) > 1.5, "drafts were rarely accepted: the accept path was not exercised"
    else:
        assert set(taus) == {1.0}


def test_cost_aware_tree_equals_transformers(family):
    """The dynamic tree (no explicit shape) under free verification grows to its depth cap; under
    costly verification it stays small. Either way the output is transformers' greedy."""
    from eagle2.config import TreeConfig

    name, model, head = family
    sizes, depths = {}, {}
    for per_node in (0.0, 3.0):
        gen = make_generator(model, head=head, tree=TreeConfig(adaptive=True, top_k=2),
                             cost_model=cost_model(per_node, level_ms=0.0 if per_node == 0 else 0.5))
        for prompt in PROMPTS:
            r = gen.generate(prompt, max_new_tokens=40)
            assert r.token_ids == hf_greedy(model, prompt, 40), f"{name} cost-aware {per_node} prompt={prompt}"
            sizes.setdefault(per_node, []).extend(r.stats.tree_sizes)
            depths.setdefault(per_node, []).extend(r.stats.tree_depths)
    assert max(depths[0.0]) == TreeConfig.max_depth, (name, depths[0.0])
    assert sum(sizes[3.0]) / len(sizes[3.0]) < sum(sizes[0.0]) / len(sizes[0.0]) / 2, (name, sizes)


def test_cost_aware_tree_takes_its_own_frontier_width(family):
    """``frontier`` (eagle2 tune's choice) sets the cost-aware tree's children per node; the fixed
    shape keeps ``top_k``. With a width of 1 every round is a chain; output stays transformers'."""
    from eagle2.config import TreeConfig

    name, model, head = family
    if name != FAMILIES[0]:
        pytest.skip("one family is enough")
    tree = TreeConfig(adaptive=True, top_k=4, frontier=1, lookup=0)  # no prompt-lookup branch
    assert tree.width == 1 and TreeConfig(top_k=4, frontier=1).width == 4  # not adaptive: the fixed top_k
    gen = make_generator(model, head=head, tree=tree, cost_model=cost_model(0.0, level_ms=0.0))
    for prompt in PROMPTS:
        r = gen.generate(prompt, max_new_tokens=30)
        assert r.token_ids == hf_greedy(model, prompt, 30), prompt
        assert all(size == depth + 1 for size, depth in zip(r.stats.tree_sizes, r.stats.tree_depths))  # chains
    with pytest.raises(ValueError, match="frontier"):
        TreeConfig(frontier=-1)


def test_greedy_with_lookup_equals_transformers(family, monkeypatch):
    """Repetitive prompts make prompt lookup propose chains; the cost-aware tree merges them and
    the output stays transformers' greedy, with lookup and without."""
    from eagle2.config import TreeConfig

    name, model, head = family
    proposed = lookup_chains(monkeypatch)
    prompts = [[3, 4, 5, 6, 3, 4, 5, 6, 3, 4, 5], [7, 8, 9] * 5, [1, 2, 3, 4, 5, 6, 7, 8]]
    for k in (8, 0):
        gen = make_generator(model, head=head, tree=TreeConfig(adaptive=True, top_k=2, lookup=k),
                             cost_model=cost_model(0.5, level_ms=0.3))
        for prompt in prompts:
            assert gen.generate(prompt, max_new_tokens=40).token_ids == hf_greedy(model, prompt, 40), (k, prompt)
        if k:
            assert sum(1 for x in proposed if x) >= 3, (name, proposed)
            proposed.clear()
        else:
            assert not proposed  # lookup off: never asked
    with pytest.raises(ValueError, match="lookup"):
        TreeConfig(lookup=-1)


def test_an_untrained_head_is_left_out_of_eagle2_which_verifies_lookup_chains_alone(family, monkeypatch):
    """A model without a trained head (``eagle2.load`` gives it a fresh one, ``head_source`` "random-init"):
    the cost-aware greedy tree never runs the head and verifies only prompt-lookup chains, and only
    where they pay; output stays transformers' greedy. At T = 1 (no chain) it verifies the root alone: the
    seeded answer is vanilla's. chain (a fixed shape) still drafts with the head."""
    from eagle2 import draft
    from eagle2.api import UNTRAINED
    from eagle2.config import TreeConfig

    name, model, _ = family
    proposed = lookup_chains(monkeypatch)
    commits: list[int] = []
    commit = draft.Drafter.commit
    monkeypatch.setattr(draft.Drafter, "commit", lambda self, f, t: commits.append(1) or commit(self, f, t))
    gen = make_generator(model, head_source=UNTRAINED, tree=TreeConfig(adaptive=True, top_k=2),
                         cost_model=cost_model(0.5, level_ms=0.3))
    sizes = []
    for prompt in ([3, 4, 5, 6, 3, 4, 5, 6, 3, 4, 5], [7, 8, 9] * 5, [1, 2, 3, 4, 5, 6, 7, 8]):
        result = gen.generate(prompt, max_new_tokens=40)
        assert result.token_ids == hf_greedy(model, prompt, 40), (name, prompt)
        sizes += result.stats.tree_sizes
    assert not commits and any(proposed), (name, proposed)
    assert max(sizes) > 1 and sizes.count(1) > 0, sizes  # chains verified where proposed, the root alone elsewhere
    sampled = gen.generate([1, 2, 3], max_new_tokens=20, temperature=1.0, seed=0)  # drawn drafts: no chain, no head
    assert set(sampled.stats.tree_sizes) == {1} and not commits
    assert sampled.token_ids == gen.generate([1, 2, 3], max_new_tokens=20, temperature=1.0, seed=0,
                                             method="vanilla").token_ids
    assert gen.generate([1, 2, 3], max_new_tokens=8, method="chain").token_ids == hf_greedy(model, [1, 2, 3], 8)
    assert commits


def test_dear_frontier_rows_are_fed_only_where_they_pay(family, monkeypatch):
    """The cost-aware tree feeds a frontier node to the head only when its predicted child would be
    verified: with free rows a level feeds about the whole frontier (less only where the node cap
    leaves its children out), with dear ones fewer nodes. The output stays transformers' greedy."""
    from eagle2 import draft
    from eagle2.config import TreeConfig

    name, model, head = family
    if name != FAMILIES[0]:
        pytest.skip("one family is enough")
    fed: list[int] = []
    feed = draft._Levels.feed_frontier

    def counting(self, d, rows):
        fed.append(rows)
        return feed(self, d, rows)

    monkeypatch.setattr(draft._Levels, "feed_frontier", counting)
    per_level = {}
    for row_ms in (0.0, 1.0):
        fed.clear()
        gen = make_generator(model, head=head, tree=TreeConfig(adaptive=True, top_k=4),
                             cost_model=cost_model(0.0, level_ms=0.0, row_ms=row_ms))
        for prompt in PROMPTS:
            assert gen.generate(prompt, max_new_tokens=30).token_ids == hf_greedy(model, prompt, 30), prompt
        assert fed and max(fed) <= 4
        per_level[row_ms] = sum(fed) / len(fed)
    assert per_level[0.0] > 3 and per_level[1.0] < per_level[0.0] - 1, per_level


def _mid_round_indices(gen, prompt, **kw):
    """(indices j of emitted tokens that have more tokens after them in the same round, all tokens)."""
    events, result = gen.stream_events(prompt, max_new_tokens=40, **kw)
    emitted, inside = 0, []
    for ev in events:
        inside += range(emitted, emitted + len(ev.token_ids) - 1)
        emitted += len(ev.token_ids)
    return inside, result.token_ids


@pytest.mark.parametrize("method", ["eagle2", "eagle1"])
def test_eos_and_max_new_tokens_mid_round(family, method):
    name, model, head = family
    tree = dict(total_tokens=16, depth=5, tree_top_k=6)
    gen = make_generator(model, head=head)
    hit_length = hit_eos = False
    for prompt in PROMPTS:
        inside, toks = _mid_round_indices(gen, prompt, method=method, **tree)
        if inside and not hit_length:  # max_new_tokens ends the output inside a round
            n = inside[0] + 1
            r = gen.generate(prompt, max_new_tokens=n, method=method, **tree)
            assert r.token_ids == hf_greedy(model, prompt, n) and r.finish_reason == "length"
            hit_length = True
        fresh = [j for j in inside if toks[j] not in toks[:j]]
        if fresh and not hit_eos:  # EOS = a token first produced inside a round, more tokens after it
            eos = toks[fresh[0]]
            eos_gen = make_generator(model, head=head)
            eos_gen.engine.eos_ids = {eos}
            r = eos_gen.generate(prompt, max_new_tokens=40, method=method, **tree)
            ref = hf_greedy(model, prompt, 40, eos=eos)
            assert r.token_ids == ref and r.token_ids[-1] == eos and r.finish_reason == "stop"
            hit_eos = True
    assert hit_length and hit_eos, f"{name}: no multi-token round to stop inside; the test exercised nothing"


def test_context_limit_is_never_exceeded():
    model = make_tiny_model("llama", vocab_size=16, max_position_embeddings=48)
    gen = make_generator(model)
    prompt = list(range(16)) * 2 + [3]  # 33 tokens, 15 left
    r = gen.generate(prompt, max_new_tokens=100, total_tokens=10, depth=6, tree_top_k=4)
    assert len(prompt) + len(r.token_ids) == 48 and r.finish_reason == "length"
    assert r.token_ids == hf_greedy(model, prompt, 15)
    with pytest.raises(ValueError, match="context"):
        gen.generate(list(range(16)) * 3, max_new_tokens=4)


def test_stop_strings_and_streaming(tiny_chat_generator):
    gen = tiny_chat_generator
    full = gen.generate([{"role": "user", "content": "Count to ten."}], max_new_tokens=30, method="vanilla")
    pieces = list(gen.stream([{"role": "user", "content": "Count to ten."}], max_new_tokens=30))
    assert "".join(pieces) == full.text
    words = full.text.split()
    assert len(words) > 3
    stop = words[2]
    cut = full.text.index(stop)
    r = gen.generate([{"role": "user", "content": "Count to ten."}], max_new_tokens=30, stop=[stop])
    assert r.text == full.text[:cut] and r.finish_reason == "stop"
    assert r.token_ids == full.token_ids[: len(r.token_ids)]
    assert stop in gen.tokenizer.decode(r.token_ids) and stop not in gen.tokenizer.decode(r.token_ids[:-1])
    streamed = "".join(gen.stream([{"role": "user", "content": "Count to ten."}], max_new_tokens=30, stop=[stop]))
    assert streamed == r.text


def test_a_fixed_shape_wider_than_the_draft_vocabulary():
    """eagle1 / chain with ``tree_top_k`` above the draft vocabulary (an FR-Spec list of 3 tokens, or a
    6-token model): a node gets at most that many children, at T = 0 (output transformers' greedy),
    at T <= draw_above (top-k tree) and above it (drawn children), also where max_new_tokens cuts the
    tree to one level, which the rank prior then makes 8 wide."""
    from eagle2.draft_head import HeadConfig, init_head

    model, small = make_tiny_model("llama", vocab_size=16, seed=1), make_tiny_model("llama", vocab_size=6, seed=3)
    head = init_head(HeadConfig.from_target(model.config))
    head.draft_vocab = torch.tensor([5, 1, 7])
    for m, gen in ((model, make_generator(model, head=head)), (small, make_generator(small))):
        for n, depth in ((3, 4), (12, 1)):  # 3 tokens: the last round's tree is cut to one level
            for method in ("eagle1", "chain"):
                shape = dict(total_tokens=16, depth=depth, tree_top_k=8)
                assert gen.generate(PROMPTS[0], max_new_tokens=n, method=method, **shape).token_ids == \
                    hf_greedy(m, PROMPTS[0], n), (method, depth, n)
                for t in (0.5, 1.0):
                    r = gen.generate(PROMPTS[0], max_new_tokens=n, method=method, temperature=t, seed=0, **shape)
                    assert len(r.token_ids) == n and max(r.token_ids) < m.config.vocab_size


def _sampled_with_one_token_kept(gen, prompt, n):
    """Outputs at T > 0 where top-k 1 or top-p 0.01 keeps only the target's best token (of 16 tokens the
    best has at least 1/16): at 1e-4, at draw_above (the top-k tree), above it (drawn children), for
    every tree kind."""
    shapes = [("eagle2", {}), ("eagle2", dict(total_tokens=10, depth=4, tree_top_k=4)),
              ("eagle1", dict(total_tokens=10, depth=4, tree_top_k=4)), ("chain", dict(depth=4))]
    for method, shape in shapes:
        for t in (1e-4, 0.7, 1.0, 5.0):
            for keep in (dict(top_k=1), dict(top_p=0.01)):
                yield (method, shape, t, keep), gen.generate(prompt, max_new_tokens=n, method=method, temperature=t,
                                                             seed=0, **keep, **shape)


def test_sampling_that_keeps_one_token_is_greedy():
    """top-k 1 / a tiny top-p leave the target one token, so any temperature and any tree must give the
    greedy output token for token: a drawn child outside the kept token is always rejected, whatever q."""
    model = make_tiny_model("llama", vocab_size=16, seed=2)
    gen = make_generator(model, head=fit_head(model), cost_model=cost_model(0.5, level_ms=0.1))
    ref = hf_greedy(model, PROMPTS[0], 20)
    taus = []
    for case, r in _sampled_with_one_token_kept(gen, PROMPTS[0], 20):
        assert r.token_ids == ref, case
        taus.append(r.stats.mean_accept_len)
    assert max(taus) > 1.5, "drafts were rarely accepted: the accept path was not exercised"


def test_negative_control_catches_top_k_and_top_p_ignored(monkeypatch):
    import eagle2.engine as engine
    from eagle2.verify import target_probs

    model = make_tiny_model("llama", vocab_size=16, seed=2)
    gen = make_generator(model, cost_model=cost_model(0.5, level_ms=0.1))
    monkeypatch.setattr(engine, "target_probs", lambda logits, t, top_k=0, top_p=1.0: target_probs(logits, t))
    ref = hf_greedy(model, PROMPTS[0], 20)
    assert sum(r.token_ids != ref for _, r in _sampled_with_one_token_kept(gen, PROMPTS[0], 20)) >= 16


def test_stats_are_consistent():
    model = make_tiny_model("qwen2", vocab_size=16)
    gen = make_generator(model)
    r = gen.generate(PROMPTS[0], max_new_tokens=30, total_tokens=10, depth=4, tree_top_k=4)
    s = r.stats
    assert s.new_tokens == len(r.token_ids) == 30
    assert s.rounds == 1 + len(s.accept_lengths)
    assert sum(s.accept_lengths) + s.rounds == s.new_tokens
    assert [a for a, _ in s.accept_stops] == s.accept_lengths  # every round of this run grew a tree
    assert all(not more for a, more in s.accept_stops if a == 4)  # depth 4 is the deepest: no children there
    assert s.mean_accept_len == pytest.approx(s.new_tokens / s.rounds)
    assert s.tokens_per_s > 0 and s.seconds >= s.draft_seconds + s.verify_seconds


def _run_all(streams) -> None:
    """Advance the streams one event at a time, in turn, until every one has ended."""
    live = [iter(events) for events in streams]
    while live:
        for events in list(live):
            if next(events, None) is None:
                live.remove(events)


@pytest.mark.parametrize("method, temperature", [("eagle2", 0.0), ("eagle1", 0.0), ("eagle2", 1.0)])
def test_interleaved_streams_draft_as_they_would_alone(family, method, temperature):
    """Two streams advanced round by round in turn: each keeps its own draft pairs, so its drafts (the
    accepted lengths, round by round) and its seeded samples are those of the same call run alone."""
    _, model, head = family
    gen = make_generator(model, head=head, cost_model=cost_model(0.5, level_ms=0.1))
    kw = dict(max_new_tokens=40, method=method, temperature=temperature, seed=5, reuse_prefix=False)
    alone = [gen.generate(p, **kw) for p in PROMPTS[:2]]
    pairs = [gen.stream_events(p, **kw) for p in PROMPTS[:2]]
    _run_all(events for events, _ in pairs)
    for a, (_, r) in zip(alone, pairs):
        assert r.token_ids == a.token_ids
        assert r.stats.accept_lengths == a.stats.accept_lengths
    assert max(a.stats.mean_accept_len for a in alone) > 1.5  # drafts were accepted: there was state to keep


def test_a_cost_probe_between_rounds_leaves_the_stream_its_drafts(family):
    _, model, head = family
    gen = make_generator(model, head=head)
    kw = dict(max_new_tokens=40, method="eagle1", reuse_prefix=False)
    alone = gen.generate(PROMPTS[0], **kw)
    events, r = gen.stream_events(PROMPTS[0], **kw)
    events = iter(events)
    for _ in range(3):
        next(events)
    gen.engine.drafter.probe_ms(2, repeats=1, context=20)
    _run_all([events])
    assert r.token_ids == alone.token_ids and r.stats.accept_lengths == alone.stats.accept_lengths


# ---- the real model --------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(smol_fp32):
    gen = smol_fp32
    # Spec-Bench's own questions beyond MT-bench (translation, qa, math) — not the MT-bench set;
    # the built-in dev prompts where the shared data is not beside the repository
    path = DATA / "eval" / "spec_bench_question.jsonl"
    if path.exists():
        qs = [json.loads(line) for line in path.read_text().splitlines()]
        picks = [q for q in qs if q["category"] in ("translation", "qa", "math_reasoning")][::40][:3]
    else:
        from eagle2.tune import DEV_PROMPTS

        picks = [{"turns": [p]} for p in DEV_PROMPTS[5:2:-1]]
    settings = [("eagle2", dict()), ("eagle1", dict(total_tokens=12, depth=4, tree_top_k=3)),
                ("chain", dict(depth=4))]
    for q, (method, tree) in zip(picks, settings):
        ids = gen.encode_prompt([{"role": "user", "content": q["turns"][0]}])
        ref = hf_greedy(gen.model, ids, 48, eos=sorted(gen.eos_ids))
        r = gen.generate(ids, max_new_tokens=48, method=method, **tree)
        assert r.token_ids == ref, (method, q["question_id"])


def _metaspace_and_wordpiece_tokenizers():
    """Two tokenizers whose decode treats a string's start specially, trained in a few ms."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["The cat sat on the mat. Don't stop, it's 3.5 km away!", "naïve café déjà vu", "x = f(y) + 2"] * 20
    meta = Tokenizer(models.BPE(unk_token="<unk>"))
    meta.pre_tokenizer, meta.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    meta.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer, wp.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece(cleanup=True)
    wp.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    return [PreTrainedTokenizerFast(tokenizer_object=t) for t in (meta, wp)]


def test_incremental_text_equals_a_full_decode(smol_tokenizer):
    """Text released round by round (windowed decode) is the whole answer's decode, for byte-level BPE
    with multi-byte characters split across tokens, a Metaspace tokenizer and word pieces with cleanup."""
    from eagle2.engine import TextTracker

    g = torch.Generator().manual_seed(0)
    text = "Déjà vu: 猫が座った 🐈‍⬛ at 3.5 km, don't stop! naïve café\n```py\nx = f(y)  # ok\n```"
    cases = [(smol_tokenizer, smol_tokenizer.encode(text, add_special_tokens=False)),
             (smol_tokenizer, torch.randint(0, len(smol_tokenizer), (300,), generator=g).tolist())]
    cases += [(t, t.encode(text.replace("猫が座った 🐈‍⬛", "the cat") * 3, add_special_tokens=False))
              for t in _metaspace_and_wordpiece_tokenizers()]
    for tok, ids in cases:
        tracker, out, i = TextTracker(tok, ()), "", 0
        while i < len(ids):
            n = int(torch.randint(1, 5, (1,), generator=g))
            kept, piece = tracker.push(ids[i:i + n])
            assert kept == ids[i:i + n] and tracker._anchor_text == tok.decode(ids[:tracker._anchor],
                                                                                skip_special_tokens=True)
            out, i = out + piece, i + n
        assert out + tracker.flush() == tok.decode(ids, skip_special_tokens=True)
        assert tracker._anchor > len(ids) // 2  # the window moved along: most rounds decoded only their tail
