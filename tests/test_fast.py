"""The lean forward (fast.py) and the FR-Spec draft vocabulary.

The lean forward must give transformers' logits (it is the default for Llama-style targets), keep
the static cache consistent through tree rounds, and decode batches exactly as ``generate`` does;
a restricted draft vocabulary must change what is drafted and never what is emitted."""

import copy

import pytest
import torch

from conftest import fit_head, make_generator, make_tiny_model
from eagle2.batch import generate_batch
from eagle2.config import Backend
from eagle2.draft_head import DraftHead
from eagle2.fast import FastTarget, make_target, supports
from eagle2.target import Target
from test_engine import PROMPTS, TREES, hf_greedy


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lean_logits_equal_transformers(family):
    model = make_tiny_model(family, vocab_size=32, seed=3)
    fast, ref = FastTarget(model), Target(model)
    c1, c2 = fast.new_cache(capacity=8), ref.new_cache()  # capacity 8: forces the cache to grow
    prompt = torch.arange(20) % 32
    l1, h1 = fast.forward(c1, prompt, torch.arange(20), None)
    l2, h2 = ref.forward(c2, prompt, torch.arange(20), None)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1, h2, atol=1e-5, rtol=1e-5)
    # a tree round: 5 nodes, node 3 is a child of node 1; then keep path (0, 1, 3) and go on
    tokens = torch.tensor([4, 9, 2, 7, 1])
    parents = [-1, 0, 0, 1, 2]
    tree = torch.eye(5, dtype=torch.bool)
    for i, p in enumerate(parents):
        j = p
        while j >= 0:
            tree[i, j] = True
            j = parents[j]
    depth = torch.tensor([0, 1, 1, 2, 2])
    allowed = torch.cat([torch.ones(5, 20, dtype=torch.bool), tree], dim=1)
    l1, _ = fast.forward(c1, tokens, 20 + depth, allowed)
    l2, _ = ref.forward(c2, tokens, 20 + depth, allowed)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    path = torch.tensor([0, 1, 3])
    fast.keep(c1, 20, path)
    ref.keep(c2, 20, path)
    assert c1.get_seq_length() == c2.get_seq_length() == 23
    nxt = torch.tensor([5, 6])  # decode steps (the small-attention path) after the compaction
    l1, _ = fast.forward(c1, nxt, torch.tensor([23, 24]), None)
    l2, _ = ref.forward(c2, nxt, torch.tensor([23, 24]), None)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    l1, _ = fast.forward(c1, nxt[:1], torch.tensor([25]), None)
    l2, _ = ref.forward(c2, nxt[:1], torch.tensor([25]), None)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)


def test_unsupported_models_take_the_general_path():
    gemma, mistral = make_tiny_model("gemma3"), make_tiny_model("mistral")
    assert not supports(gemma)[0] and "gemma3" in supports(gemma)[1]
    assert supports(mistral) == (False, "sliding-window attention")
    assert type(make_target(gemma)) is Target
    assert type(make_target(make_tiny_model("llama"))) is FastTarget
    assert type(make_target(make_tiny_model("llama"), "transformers")) is Target
    with pytest.raises(ValueError, match="unavailable: sliding-window"):
        make_target(mistral, "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        make_target(gemma, "turbo")
    assert type(make_target(make_tiny_model("llama"), Backend(forward="transformers"))) is Target


def test_backend_comes_from_the_environment_once():
    """The three switches are read by ``Backend.from_env`` (on unless "0"); a Backend value passes as it is."""
    env = {"EAGLE2_NATIVE": "0", "EAGLE2_PACKED_LINEAR": "1"}
    assert Backend.from_env("fast", environ=env) == Backend(forward="fast", native=False)
    assert Backend.of(Backend(lowbit=False), exact=True) == Backend(lowbit=False, exact=True)
    with pytest.raises(ValueError, match="backend must be a Backend"):
        Backend.of(3)
    with pytest.raises(ValueError, match="native must be True or False"):
        Backend(native="no")


def test_switches_reach_the_stacks_and_gen_backend_says_what_runs():
    model = make_tiny_model("llama", vocab_size=32)
    off = Backend(native=False, packed_linear=False)
    tgt = FastTarget(model, backend=off)
    assert not tgt.stack.is_native and not tgt.stack.packed and not tgt._lm.packed
    gen = make_generator(model, backend=off)
    assert gen.backend == Backend(forward="fast", native=False, packed_linear=False, lowbit=False, exact=False)
    assert not gen.drafter.stack.is_native and not gen.drafter.stack.packed and not gen.drafter.fc.packed


@pytest.mark.parametrize("method", ["eagle2", "eagle1", "vanilla"])
def test_both_backends_give_the_same_tokens(method):
    model = make_tiny_model("llama", vocab_size=16)
    head = fit_head(model)
    fast, general = make_generator(model, head=head), make_generator(model, head=head, backend="transformers")
    assert fast.backend.forward == "fast" and general.backend.forward == "transformers"
    assert not general.backend.exact and not general.backend.lowbit  # only the lean forward reads block weights
    for prompt in PROMPTS:
        ref = hf_greedy(model, prompt, 30)
        for tree in TREES[:2]:
            assert fast.generate(prompt, max_new_tokens=30, method=method, **tree).token_ids == ref
            assert general.generate(prompt, max_new_tokens=30, method=method, **tree).token_ids == ref


def test_batched_generation_equals_generate():
    model = make_tiny_model("qwen2", vocab_size=16, seed=1)
    prompts = [[1, 2, 3], list(range(16)) + [4], [5] * 9, [9, 8]]
    eos = {3}
    out = generate_batch(FastTarget(model), prompts, 12, eos)
    for p, o in zip(prompts, out):
        ref = hf_greedy(model, p, 12, eos=3)
        assert o == ref, p
        assert len(o) == 12 or o[-1] == 3


def test_draft_vocabulary_restricts_drafts_not_output(tmp_path):
    model = make_tiny_model("llama", vocab_size=32, seed=2)
    head = fit_head(model)
    allowed = torch.tensor([5, 1, 7, 3, 9, 11, 2, 0])
    head.draft_vocab = allowed
    head.save(tmp_path / "h")
    loaded = DraftHead.load(tmp_path / "h")
    assert loaded.draft_vocab.tolist() == allowed.tolist()
    gen = make_generator(model, head=loaded)
    seen = []
    orig = gen.drafter.grow

    def spy(root, *a, **kw):
        tree = orig(root, *a, **kw)
        seen.extend(tree.tokens[1:].tolist())
        return tree

    gen.drafter.grow = spy
    for prompt in PROMPTS:
        for method in ("eagle2", "eagle1"):
            r = gen.generate(prompt, max_new_tokens=30, method=method, total_tokens=8, depth=3, tree_top_k=3)
            assert r.token_ids == hf_greedy(model, prompt, 30)
    assert seen and set(seen) <= set(allowed.tolist())
    full = make_generator(model, head=loaded, draft_vocab=0)  # 0: the full vocabulary
    assert full.drafter.vocab_ids is None
    assert make_generator(model, head=loaded, draft_vocab=3).drafter.vocab_ids.tolist() == [5, 1, 7]


def test_corrupt_draft_vocabulary_is_refused(tmp_path):
    from safetensors.torch import save_file

    model = make_tiny_model("llama", vocab_size=32)
    head = fit_head(model, steps=1)
    head.save(tmp_path / "h")
    save_file({"token_ids": torch.tensor([1, 1, 40])}, str(tmp_path / "h" / "draft_vocab.safetensors"))
    with pytest.raises(ValueError, match="distinct token ids"):
        DraftHead.load(tmp_path / "h")
    (tmp_path / "h" / "draft_vocab.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not read the draft vocabulary"):
        DraftHead.load(tmp_path / "h")


def _native_or_skip():
    import shutil

    from eagle2 import native

    if native.load() is None:
        # Where a compiler and ninja exist (this project's machines, CI) the build must work.
        assert not (shutil.which("c++") and shutil.which("ninja")), "native forward failed to build"
        pytest.skip("no C++ toolchain: the native forward is unavailable here")


def test_native_layout_is_named_and_checked():
    """C++ and Python agree on a layer's tensors and the activation codes by name; a build that reads
    another layout is refused with a message naming both sides."""
    from types import SimpleNamespace

    from eagle2 import native

    _native_or_skip()
    built = native.load()
    assert tuple(built.layer_layout()) == native.LayerTensors._fields
    assert native.layout_mismatch(built) is None
    assert {native.activation_code(a) for a in native.ACTIVATION_KINDS} == set(built.activation_codes().values())
    swapped = list(native.LayerTensors._fields)
    swapped[1], swapped[3] = swapped[3], swapped[1]
    other = SimpleNamespace(layer_layout=lambda: swapped, activation_codes=built.activation_codes)
    assert "o, qkv_bias, qkv" in native.layout_mismatch(other)
    no_gelu = SimpleNamespace(layer_layout=built.layer_layout, activation_codes=lambda: {"silu": 0})
    assert "no activation gelu, gelu_tanh" in native.layout_mismatch(no_gelu)


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                          ("qwen2", torch.float32), ("qwen2", torch.bfloat16)])
def test_native_stack_is_bit_identical_to_the_python_loop(family, dtype):
    """The C++ stack (ATen calls + fused RoPE / RMSNorm loops) gives the Python loop's bits, cache
    included, through a batched prefill with padding (ATen kernels: > 64 rows), a shorter
    prefill, a tree-sized step and a one-token step (fused loops)."""
    from eagle2.fast import additive_mask

    _native_or_skip()
    model = make_tiny_model(family, vocab_size=32, seed=5).to(dtype)
    tgt = FastTarget(model)
    assert tgt.stack.is_native
    caches = [tgt.new_cache(capacity=80, batch=2) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    steps = [(40, torch.ones(2, 40, 40, dtype=torch.bool).tril()), (12, None), (5, None), (1, None)]
    steps[0][1][1, :, :3] = False  # row 1 is left-padded by 3
    for t, mask in steps:
        past = caches[0].length
        if mask is None:
            mask = torch.ones(2, t, past + t, dtype=torch.bool).tril(past)
            mask[1, :, :3] = False
        x = torch.randn(2, t, 32, generator=g).to(dtype)
        pos = torch.arange(past, past + t).expand(2, t)
        cos, sin = (r[:, None] for r in tgt.rope.rows(pos))
        outs = []
        for cache, python in zip(caches, (True, False)):
            outs.append(tgt.stack(x, cos, sin, additive_mask(mask, dtype), cache, past, python=python))
            cache.length = past + t
        assert torch.equal(outs[0], outs[1])
        assert torch.equal(caches[0].k[:, :, :, :past + t], caches[1].k[:, :, :, :past + t])
        assert torch.equal(caches[0].v[:, :, :, :past + t], caches[1].v[:, :, :, :past + t])


def test_drafter_runs_the_head_as_its_module_does():
    """The drafter's lean head layer (fast.Stack, static cache, tree entries after the true pairs)
    gives the DraftHead module's outputs: a commit, a second commit, then a tree level."""
    from eagle2.draft import Drafter

    model = make_tiny_model("llama", vocab_size=32, seed=6)
    head = fit_head(model, steps=5).eval()
    drafter = Drafter(head, FastTarget(model), backend=Backend(lowbit=False))  # the head's own weights
    g = torch.Generator().manual_seed(1)
    feats, toks = torch.randn(9, 32, generator=g), torch.randint(0, 32, (9,), generator=g)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        ref, (k, v) = head(feats[None, :6], emb(toks[None, :6]), torch.arange(6)[None])
        torch.testing.assert_close(drafter.commit(feats[:6], toks[:6]), ref[0, -1], atol=1e-5, rtol=1e-5)
        ref2, (k2, v2) = head(feats[None, 6:], emb(toks[None, 6:]), torch.arange(6, 9)[None], past=(k, v),
                              mask=torch.ones(1, 1, 3, 9, dtype=torch.bool).tril(6))
        torch.testing.assert_close(drafter.commit(feats[6:], toks[6:]), ref2[0, -1], atol=1e-5, rtol=1e-5)
        # two sibling tree nodes at position 9: each sees the 9 true pairs and itself only
        nodes, ntok = torch.randn(2, 32, generator=g), torch.tensor([4, 11])
        past = (torch.cat([k, k2], 2), torch.cat([v, v2], 2))
        mask = torch.cat([torch.ones(2, 9, dtype=torch.bool), torch.eye(2, dtype=torch.bool)], 1)
        ref3, _ = head(nodes[None], emb(ntok[None]), torch.full((1, 2), 9), past=past, mask=mask[None, None])
        got = drafter._run(nodes, ntok, torch.full((2,), 9), drafter.length, mask)
        torch.testing.assert_close(got, ref3[0], atol=1e-5, rtol=1e-5)


def test_drafter_reads_its_head_as_8_bit_blocks():
    """Where the block kernel runs, the drafter reads the head's projections as 8-bit blocks: its
    outputs equal the module's with every projection rounded by ``round_to_q8``, and stay near the
    module's own."""
    from eagle2.draft import Drafter
    from eagle2.kernels import lowbit_runs, round_to_q8

    if not lowbit_runs(torch.float32, torch.device("cpu")):
        pytest.skip("no fp32 block kernel on this CPU")
    model = make_tiny_model("llama", vocab_size=32, seed=6)
    head = fit_head(model, steps=5).eval()
    drafter = Drafter(head, FastTarget(model))
    assert drafter.fc.lowbit is not None and drafter.stack.layers[0].gu.lowbit is not None
    rounded = copy.deepcopy(head)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name.endswith("proj.weight") or name == "fc.weight":
                p.copy_(round_to_q8(p))
    g = torch.Generator().manual_seed(1)
    feats, toks = torch.randn(9, 32, generator=g), torch.randint(0, 32, (9,), generator=g)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        got = drafter.commit(feats, toks)
        ref = rounded(feats[None], emb(toks[None]), torch.arange(9)[None])[0][0, -1]
        own = head(feats[None], emb(toks[None]), torch.arange(9)[None])[0][0, -1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert 0 < float((got - own).abs().max()) < 0.05 * float(own.abs().max())


def test_native_builds_for_every_x86_isa(tmp_path, monkeypatch):
    """The extension is compiled with the vector flags of the ISA torch detects (native._vector_flags),
    and its AVX512-BF16 / AMX kernels carry their own target attributes: a build with AVX2 flags only
    (a Zen 2 machine's) must compile too, and its fp32 block kernel must agree with F.linear."""
    import platform

    import torch.nn.functional as F

    from eagle2 import kernels, native
    from test_kernels import _q4_blocks

    _native_or_skip()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86 only")
    monkeypatch.setenv("EAGLE2_CACHE", str(tmp_path))
    mod = native._build(["-O3", "-ffp-contract=off", "-mavx2", "-mfma", "-mf16c"], [])
    if not mod.block_isa_f32():
        pytest.skip("this CPU has no AVX2 + FMA")
    src = _q4_blocks(32, 64, seed=1)
    recs = kernels.pack_lowbit(src.to(torch.bfloat16), src)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    assert (mod.block_linear(x, recs, None) - F.linear(x, src)).abs().max() <= 1e-5 * F.linear(x, src).abs().mean()
