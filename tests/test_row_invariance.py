"""Row-invariant numerics (issue 16): with ``exact`` on, a token's logits are the same bits whether the
target computes it alone (a decode step) or as one row of a 2..32-row tree verification, so greedy
speculative decoding equals the engine's vanilla decoding token for token in bf16.

The model here is small but not tiny — head dim 64, MLP width 1536, a prefix of ~100 keys — because
the kernels that break invariance switch on such sizes: oneDNN's bf16 product takes another kernel for
one row, ATen's CPU attention blocks keys by the call's key count and takes another exp for a block's
tail. With ``exact=False`` (ATen's kernels) the checks below fail on an AVX-512 CPU."""

import pytest
import torch

from conftest import cost_model, fit_head, make_generator, make_tiny_model
from eagle2 import native
from eagle2.config import Backend
from eagle2.fast import FastTarget, additive_mask, exact_attention, exact_attention_rows, exact_default

DTYPES = [torch.bfloat16, torch.float16]


def wide_model(dtype, seed=0, vocab_size=96):
    model = make_tiny_model("llama", vocab_size=vocab_size, seed=seed, hidden_size=256, intermediate_size=1536,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return model.to(dtype)


def random_tree(m: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ancestor-or-self mask [m, m], depths [m]) of a random tree rooted at node 0."""
    mask, depth = torch.eye(m, dtype=torch.bool), torch.zeros(m, dtype=torch.long)
    for i in range(1, m):
        p = int(torch.randint(0, i, (1,), generator=g))
        mask[i] |= mask[p]
        depth[i] = depth[p] + 1
    return mask, depth


def _row_checks(tgt: FastTarget, python: bool, seed: int = 0) -> list[str]:
    """Run decode steps and verifications over copies of one prefilled cache; return what differed.

    Each verification puts a token at node i of a random tree of m nodes; the decode step runs that
    token alone after the prefix plus the node's ancestors, decoded one by one (as vanilla decoding
    would have them in its cache): both must give the same logits and the same cache entry."""
    g = torch.Generator().manual_seed(seed)
    n, v = 97, tgt.vocab_size
    base = tgt.new_cache(capacity=n + 48)
    with torch.inference_mode():
        tgt.forward(base, torch.randint(0, v, (n,), generator=g), torch.arange(n), None)
    bad = []

    def run(cache, tokens, depths, tree):
        allowed = torch.cat([torch.ones(tokens.shape[0], cache.length, dtype=torch.bool), tree], dim=1)
        pos = cache.length + depths
        cos, sin = (r[None, None] for r in tgt.rope.rows(pos))
        past = cache.length
        h = tgt.stack(tgt.embed(tokens[None]), cos, sin, additive_mask(allowed[None], tgt.dtype), cache, past,
                      python=python)
        cache.length = past + tokens.shape[0]
        return tgt.logits(h[0])

    with torch.inference_mode():
        for m in (2, 3, 5, 8, 13, 16, 24, 32):
            tree, depth = random_tree(m, g)
            tokens = torch.randint(0, v, (m,), generator=g)
            cache = _copy(base)
            logits = run(cache, tokens, depth, tree)
            for i in sorted({0, m - 1, int(depth.argmax())}):
                path = tree[i].nonzero()[:, 0]  # node i's ancestors and itself, root first
                alone = _copy(base)
                for j in path:  # vanilla: one token per step
                    row = run(alone, tokens[j:j + 1], torch.zeros(1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool))
                if not torch.equal(row[0], logits[i]):
                    bad.append(f"logits of node {i} in {m} rows")
                at = n + len(path) - 1
                if not (torch.equal(alone.k[:, :, :, at], cache.k[:, :, :, n + i])
                        and torch.equal(alone.v[:, :, :, at], cache.v[:, :, :, n + i])):
                    bad.append(f"cache entry of node {i} in {m} rows")
    return bad


def _copy(cache):
    import copy

    return copy.deepcopy(cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("python", [False, True])
def test_a_row_is_the_same_alone_or_in_a_tree(dtype, python):
    tgt = FastTarget(wide_model(dtype), backend=Backend(exact=True))
    assert tgt.exact
    if not python and not tgt.stack.is_native:
        pytest.skip("native forward unavailable")
    assert _row_checks(tgt, python) == []


@pytest.mark.parametrize("isa", ["avx2", "none"])
def test_rows_stay_invariant_in_a_build_for_a_smaller_isa(isa, monkeypatch):
    """The extension is compiled for the vector ISA torch detects, and its attention has code per vector
    width (AVX-512, AVX2, SSE). On this CPU, build it as an AVX2-only CPU (Zen 2) or one with no vector
    flags would, and check the same invariance with that build."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64") or native.load() is None:
        pytest.skip("needs an x86-64 CPU and a working compiler")
    flags = {"avx2": ["-mavx2", "-mfma", "-mf16c"], "none": []}[isa]
    monkeypatch.setattr(native, "_vector_flags", lambda: flags)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_tried", False)
    tgt = FastTarget(wide_model(torch.bfloat16), backend=Backend(exact=True))
    assert tgt.stack.is_native and native.load() is not None
    assert _row_checks(tgt, python=False) == []


def test_exact_setting_and_default():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert FastTarget(wide_model(dtype), backend=Backend(exact=True)).exact
        assert not FastTarget(wide_model(dtype), backend=Backend(exact=False)).exact
    built = native.load() is not None
    assert FastTarget(wide_model(torch.bfloat16)).exact == exact_default(torch.bfloat16, native_ok=built) == built
    assert FastTarget(wide_model(torch.float32)).exact == built  # fp32 too: the contract tests run with it
    assert not FastTarget(wide_model(torch.bfloat16), backend=Backend(native=False)).exact  # slow fallback: off
    assert not exact_default(torch.bfloat16, torch.device("meta"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_attention_agrees_with_sdpa(dtype):
    """The hand-written kernel computes SDPA's function (to the dtype's rounding), skips masked keys,
    and its torch fallback (no native extension) agrees with it to rounding."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    # head dims whole and not whole multiples of the kernel's 8-float chunks; key counts with a partial last
    # block of 8, one in a cache with no room past it
    for hq, hk, d, past, t, room in [(9, 3, 64, 100, 16, 3), (4, 2, 8, 20, 5, 3), (8, 8, 72, 33, 1, 3),
                                     (4, 1, 12, 9, 3, 0), (6, 2, 32, 13, 2, 0)]:
        kc, vc = torch.randn(2, 2, hk, past + t + room, d, generator=g).to(dtype)
        q = (torch.randn(2, hq, t, d, generator=g) * 2).to(dtype)
        allowed = torch.ones(2, t, past + t, dtype=torch.bool).tril(past)
        allowed[1, :, :3] = False
        bias, s = additive_mask(allowed, dtype), past + t
        ref = F.scaled_dot_product_attention(q.double(), kc[:, :, :s].double(), vc[:, :, :s].double(),
                                             attn_mask=bias.double(), scale=d ** -0.5, enable_gqa=True)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        got = exact_attention(q, kc, vc, bias, s, d ** -0.5)
        torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)
        fallback = exact_attention_rows(q, kc, vc, bias, d ** -0.5)
        torch.testing.assert_close(fallback.double(), ref, atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def bf16_generator():
    """A bf16 model with a 512-token vocabulary (near-ties at bf16 resolution are common: with
    ``exact=False`` speculation and vanilla part ways on about half of the prompts below) and a head
    fitted to it."""
    model = make_tiny_model("llama", vocab_size=512, seed=2, hidden_size=256, intermediate_size=1536,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    head = fit_head(model, steps=60)
    return make_generator(model.to(torch.bfloat16), head=head, exact=True)


@pytest.mark.parametrize("method", ["eagle2", "eagle1", "chain"])
def test_greedy_speculation_equals_vanilla_in_bf16(bf16_generator, method):
    """Greedy eagle2 / eagle1 / chain give the engine's vanilla tokens, bf16."""
    gen = bf16_generator
    assert gen.target.exact
    g = torch.Generator().manual_seed(4)
    for _ in range(6):
        prompt = torch.randint(0, 512, (90,), generator=g).tolist()
        ref = gen.generate(prompt, max_new_tokens=48, method="vanilla").token_ids
        out = gen.generate(prompt, max_new_tokens=48, method=method, total_tokens=16, depth=5, tree_top_k=4)
        assert out.token_ids == ref


def test_block_weights_are_row_invariant_too(tmp_path):
    """A dequantized-GGUF model (4-bit layers, 8-bit lm_head) on the low-bit block kernel: rows of up
    to 64 stay on that kernel when exact, so a tree row equals the token decoded alone."""
    from test_kernels import as_gguf_blocks, needs_lowbit  # noqa: F401

    from eagle2 import kernels

    if not kernels.lowbit_usable(torch.zeros(16, 32, dtype=torch.bfloat16)):
        pytest.skip("the block-weight kernel needs AVX512-BF16 and the native extension")
    from transformers import AutoModelForCausalLM

    model = wide_model(torch.float32)
    as_gguf_blocks(model)
    model.save_pretrained(tmp_path)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    tgt = FastTarget(bf16, backend=Backend(exact=True))
    assert tgt.stack.layers[0].down.lowbit is not None
    assert _row_checks(tgt, python=False) == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_prefill_is_the_same_however_it_is_split(dtype):
    """An exact forward runs a long prefill in chunks the exact numerics cover, so the cache and the
    features are the same bits whether a sequence comes in one call or in many (what lets the engine
    reuse a cache for the next prompt). With ``exact=False`` ATen's kernels take the long call and on
    an AVX-512 CPU the bits differ."""
    tokens = torch.randint(0, 96, (150,), generator=torch.Generator().manual_seed(1))

    def split(tgt, cuts):
        cache, feats, start = tgt.new_cache(capacity=160), [], 0
        with torch.inference_mode():
            for end in list(cuts) + [tokens.shape[0]]:
                feats.append(tgt.forward(cache, tokens[start:end], torch.arange(start, end), None)[1])
                start = end
        return cache, torch.cat(feats)

    tgt = FastTarget(wide_model(dtype), backend=Backend(exact=True))
    if not tgt.stack.is_native:
        pytest.skip("native forward unavailable")
    assert tgt.row_invariant
    whole, feats = split(tgt, [])
    for cuts in ([149], [70], [5, 64, 130], range(1, 150)):
        cache, f = split(tgt, cuts)
        assert torch.equal(f, feats) and torch.equal(cache.k[:, :, :, :150], whole.k[:, :, :, :150])
        assert torch.equal(cache.v[:, :, :, :150], whole.v[:, :, :, :150])
    assert not FastTarget(wide_model(dtype), backend=Backend(exact=False)).row_invariant


def test_next_turn_reuses_the_cache_and_keeps_the_output(bf16_generator):
    """A prompt that starts with the last call's tokens (prompt + answer, as a chat's next turn does)
    prefills only the rest, and its answer is the one a full prefill gives, for every method; a
    stream closed midway still leaves a cache that the next call can use."""
    gen = bf16_generator
    assert gen.target.row_invariant
    g = torch.Generator().manual_seed(7)
    for method in ("eagle2", "vanilla", "chain"):
        first = torch.randint(0, 512, (80,), generator=g).tolist()
        answer = gen.generate(first, max_new_tokens=40, method=method).token_ids
        follow = first + answer[:30] + torch.randint(0, 512, (12,), generator=g).tolist()
        again = gen.generate(follow, max_new_tokens=32, method=method)
        assert again.stats.reused_prefix == 80 + 30
        fresh = gen.generate(follow, max_new_tokens=32, method=method, reuse_prefix=False)
        assert fresh.stats.reused_prefix == 0 and again.token_ids == fresh.token_ids
        sampled = [gen.generate(follow, max_new_tokens=24, method=method, temperature=0.8, seed=3, reuse_prefix=r)
                   for r in (True, False)]  # the same logits, so the same draws
        assert sampled[0].stats.reused_prefix > 0 and sampled[0].token_ids == sampled[1].token_ids
    events, _ = gen.stream_events(first, max_new_tokens=40)
    for i, _ in zip(range(3), events):
        pass
    events.close()  # a client that went away after three rounds
    out = gen.generate(first + [5, 6], max_new_tokens=16)
    assert out.stats.reused_prefix == 80
    assert out.token_ids == gen.generate(first + [5, 6], max_new_tokens=16, reuse_prefix=False).token_ids


def test_interleaved_conversations_each_find_their_cache(bf16_generator):
    """Several conversations taking turns (users of one server) each get their own kept cache back."""
    gen = bf16_generator
    g = torch.Generator().manual_seed(9)
    talks = [torch.randint(0, 512, (70,), generator=g).tolist() for _ in range(3)]
    cached = [0, 0, 0]  # tokens each conversation's cache holds: its prompt and answer but the last token
    for turn in range(3):
        for i, talk in enumerate(talks):
            out = gen.generate(talk, max_new_tokens=12)
            assert out.stats.reused_prefix == cached[i], (turn, i)
            cached[i] = len(talk) + len(out.token_ids) - 1
            talk += out.token_ids + [i + 1, 2, 3, 4, 5]  # the answer and the user's next message
    gen.clear_cache()
    assert gen.generate(talks[0], max_new_tokens=4).stats.reused_prefix == 0


@pytest.mark.filterwarnings("ignore:bfloat16 without row-invariant numerics")  # that case, on purpose
def test_no_reuse_where_rows_are_not_invariant():
    """Without row-invariant numerics a kept cache could differ from a fresh prefill in its last bits,
    so it is never reused."""
    model = make_tiny_model("llama", vocab_size=64, seed=3)
    for gen in (make_generator(model.to(torch.bfloat16), exact=False), make_generator(model, backend="transformers")):
        assert not gen.target.row_invariant
        prompt = list(range(20))
        answer = gen.generate(prompt, max_new_tokens=8).token_ids
        assert gen.generate(prompt + answer + [1, 2], max_new_tokens=4).stats.reused_prefix == 0


def test_next_turn_drafts_as_a_fresh_call(bf16_generator, monkeypatch):
    """A next turn takes the target's kept cache, but the draft head commits the whole prompt's pairs
    in one call, as a fresh call does: the head's forward is not row-invariant, and pairs it committed a
    few per round in the earlier turn would draft, and at T > 0 sample, differently than a fresh call."""
    gen = bf16_generator
    gen.clear_cache()
    first = torch.randint(0, 512, (60,), generator=torch.Generator().manual_seed(11)).tolist()
    follow = first + gen.generate(first, max_new_tokens=20).token_ids + [7, 8, 9]
    rows, commit = [], gen.drafter.commit
    monkeypatch.setattr(gen.drafter, "commit", lambda f, t: rows.append(t.shape[0]) or commit(f, t))
    kw = dict(max_new_tokens=16, temperature=1.0, seed=4)
    out = gen.generate(follow, **kw)
    reused_rows, rows[:] = rows[:], []
    fresh = gen.generate(follow, reuse_prefix=False, **kw)
    assert out.stats.reused_prefix == len(follow) - 4 and reused_rows[0] == len(follow)
    assert reused_rows == rows and out.token_ids == fresh.token_ids
    assert out.stats.accept_lengths == fresh.stats.accept_lengths


def test_a_shared_beginning_is_copied_not_taken(bf16_generator):
    """A new conversation that shares only its beginning (a system prompt) with a kept cache copies that
    part, and the kept cache still serves its own conversation's next turn in full."""
    gen = bf16_generator
    gen.clear_cache()
    g = torch.Generator().manual_seed(13)
    system = torch.randint(0, 512, (30,), generator=g).tolist()
    a = system + torch.randint(0, 512, (60,), generator=g).tolist()
    a_answer = gen.generate(a, max_new_tokens=12).token_ids
    b = system + torch.randint(0, 512, (50,), generator=g).tolist()
    other = gen.generate(b, max_new_tokens=12)
    assert other.stats.reused_prefix == 30
    assert other.token_ids == gen.generate(b, max_new_tokens=12, reuse_prefix=False).token_ids
    a_next = a + a_answer + [1, 2, 3]
    assert gen.generate(a_next, max_new_tokens=4).stats.reused_prefix == len(a) + len(a_answer) - 1
    long_system = torch.randint(0, 512, (70,), generator=g).tolist()  # most of a conversation, yet 51 kept tokens follow
    c = long_system + torch.randint(0, 512, (40,), generator=g).tolist()
    c_answer = gen.generate(c, max_new_tokens=12).token_ids
    assert gen.generate(long_system + [4, 5, 6], max_new_tokens=4).stats.reused_prefix == 70
    assert gen.generate(c + c_answer + [1], max_new_tokens=4).stats.reused_prefix == len(c) + len(c_answer) - 1


def test_a_long_prefill_runs_in_chunks_a_consumer_can_stop_between(bf16_generator, monkeypatch):
    """A row-invariant target prefills in ``PREFILL_CHUNK``-token forwards, each but the last followed by a
    token-less event: the answer is one full forward's, and closing the events there runs no more forwards."""
    import eagle2.engine as engine

    gen = bf16_generator
    gen.clear_cache()
    prompt = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(17)).tolist()
    whole = gen.generate(prompt, max_new_tokens=16, reuse_prefix=False)
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 32)
    calls, forward = [], gen.target.forward
    monkeypatch.setattr(gen.target, "forward", lambda cache, toks, *a, **k: calls.append(toks.shape[0]) or
                        forward(cache, toks, *a, **k))
    events, result = gen.stream_events(prompt, max_new_tokens=16, reuse_prefix=False)
    events = list(events)
    assert calls[:4] == [32, 32, 32, 4] and [ev.token_ids for ev in events[:3]] == [[], [], []]
    assert result.token_ids == whole.token_ids and result.stats.rounds == whole.stats.rounds
    calls.clear()
    events, result = gen.stream_events(prompt, max_new_tokens=16, reuse_prefix=False)
    next(events)  # the first chunk is in; the client goes away
    events.close()
    assert calls == [32] and result.token_ids == []


@pytest.mark.parametrize("capture", [(), (0, 1, 2)])
def test_forwards_run_together_give_each_ones_bits(capture):
    """``forward_many`` runs small forwards of several sequences in one pass over the weights (a server's
    requests side by side): each call's logits, features and cache entries are the bits it gets alone,
    with or without captured layers (an EAGLE-3 head's features), in groups of up to 64 rows."""
    from eagle2.target import Forward

    tgt = FastTarget(wide_model(torch.bfloat16, vocab_size=512), backend=Backend(exact=True))
    if not tgt.stack.is_native:
        pytest.skip("native forward unavailable")
    tgt.capture(capture)
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        caches = []
        for n in (37, 120, 5, 64, 90):
            cache = tgt.new_cache(capacity=n + 64)
            tgt.forward(cache, torch.randint(0, 512, (n,), generator=g), torch.arange(n), None)
            caches.append(cache)
        calls = []
        for cache, m in zip(caches, (6, 1, 17, 40, 30)):  # 6 + 1 + 17 + 40 rows run together, then 30
            tree, depth = random_tree(m, g)
            allowed = torch.cat([torch.ones(m, cache.length, dtype=torch.bool), tree], dim=1)
            calls.append(Forward(cache, torch.randint(0, 512, (m,), generator=g), cache.length + depth, allowed))
        calls[1].allowed, calls[2].logits_rows = None, slice(3, 9)  # a causal step; logits of some rows only
        alone = [tgt.copy_prefix(c, c.length) for c in caches]
        want = [tgt.forward(a, c.tokens, c.positions, c.allowed, c.logits_rows) for a, c in zip(alone, calls)]
        got = tgt.forward_many(calls)
    for (wl, wf), (gl, gf), a, c in zip(want, got, alone, caches):
        n = a.length
        assert c.length == n and torch.equal(gl, wl) and torch.equal(gf, wf)
        assert torch.equal(c.k[:, :, :, :n], a.k[:, :, :, :n]) and torch.equal(c.v[:, :, :, :n], a.v[:, :, :, :n])
    assert got[0][1].shape[-1] == tgt.hidden_size * max(1, len(capture))


def test_decodes_stepped_together_give_their_own_tokens(bf16_generator, monkeypatch):
    """Several generations advanced together (``step_together``, one target forward of each per step,
    run as one) give the tokens each gives alone, greedy and seeded sampling, tree and plain alike; the
    shared forwards did run together; a decode that fails ends alone."""
    from eagle2 import fast

    gen = bf16_generator
    g = torch.Generator().manual_seed(13)
    jobs = [(torch.randint(0, 512, (n,), generator=g).tolist(), kw) for n, kw in (
        (40, dict(max_new_tokens=30)), (90, dict(max_new_tokens=12, method="vanilla")),
        (15, dict(max_new_tokens=40, temperature=0.8, seed=3)), (60, dict(max_new_tokens=25, method="chain")))]
    alone = [gen.generate(p, reuse_prefix=False, **kw) for p, kw in jobs]
    together = []
    monkeypatch.setattr(fast.FastTarget, "_together", _counting(fast.FastTarget._together, together))
    started = [gen.begin(p, reuse_prefix=False, **kw) for p, kw in jobs]

    def failing(decode):  # the fifth decode fails after its third event
        seen = 0
        answer = None
        while True:
            item = decode.send(answer)
            seen += not isinstance(item, fast.Forward)
            if seen > 3:
                decode.close()
                raise RuntimeError("this decode fails")
            answer = yield item

    bad, _ = gen.begin(jobs[0][0], max_new_tokens=30, reuse_prefix=False)
    decodes = [d for d, _ in started] + [failing(bad)]
    errors, steps = {}, 0
    while decodes:
        out = gen.step_together(decodes)
        steps += 1
        for d, st in zip(list(decodes), out):
            if st.error is not None:
                errors[id(d)] = str(st.error)
            if st.ended:
                decodes.remove(d)
    assert [r.token_ids for _, r in started] == [a.token_ids for a in alone]
    assert [r.text for _, r in started] == [a.text for a in alone]
    assert list(errors.values()) == ["this decode fails"]
    assert len(together) > 10 and max(together) == 5  # steps with up to all five decodes in one forward


def test_only_greedy_rounds_size_their_trees_for_a_shared_forward(monkeypatch):
    """Stepped together, a greedy decode sizes its tree for the shared forward (the first row's cost split);
    a sampled one keeps the trees it builds alone at every temperature, top-k trees (0 < T <= 0.7)
    included, since its tree decides its random draws: the same seed, the same answer."""
    from eagle2 import engine

    besides = []  # the ``beside`` of every round's budget
    at = engine._Budgets.at

    def recording(self, cached, beside=1):
        besides.append(beside)
        return at(self, cached, beside)

    monkeypatch.setattr(engine._Budgets, "at", recording)
    model = make_tiny_model("llama", vocab_size=512, seed=5, hidden_size=128, intermediate_size=512,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    gen = make_generator(model, head=fit_head(model, steps=40), exact=True, cost_model=cost_model(4.0))
    g = torch.Generator().manual_seed(21)
    jobs = [(torch.randint(0, 512, (n,), generator=g).tolist(), kw) for n, kw in (
        (30, dict(max_new_tokens=40)), (50, dict(max_new_tokens=40, temperature=0.5, seed=5)),
        (40, dict(max_new_tokens=40, temperature=1.0, seed=6)))]
    alone = [gen.generate(p, reuse_prefix=False, **kw) for p, kw in jobs]
    started = [gen.begin(p, reuse_prefix=False, **kw) for p, kw in jobs]
    decodes = [d for d, _ in started]
    while decodes:
        for d, st in zip(list(decodes), gen.step_together(decodes)):
            assert st.error is None
            if st.ended:
                decodes.remove(d)
    together = [r for _, r in started]
    assert [r.token_ids for r in together] == [a.token_ids for a in alone]
    assert max(besides) == 3  # the greedy decode sized trees for a forward shared three ways
    for a, r in zip(alone[1:], together[1:]):
        assert r.stats.tree_sizes == a.stats.tree_sizes


def _counting(fn, sizes: list):
    def wrapped(self, calls):
        sizes.append(len(calls))
        return fn(self, calls)
    return wrapped
