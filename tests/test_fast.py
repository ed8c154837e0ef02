"""The lean forward (fast.py) and the FR-Spec draft vocabulary.

The lean forward must give transformers' logits (it is the default for Llama-style targets), keep
the static cache consistent through tree rounds, and decode batches exactly as ``generate`` does;
a restricted draft vocabulary must change what is drafted and never what is emitted."""

import pytest
import torch

from conftest import fit_head, make_generator, make_tiny_model
from eagle2.api import make_target
from eagle2.draft_head import DraftHead
from eagle2.fast import FastTarget, supports
from eagle2.target import Target
from eagle2.train.responses import fast_generate
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


@pytest.mark.parametrize("method", ["eagle2", "eagle1", "vanilla"])
def test_both_backends_give_the_same_tokens(method):
    model = make_tiny_model("llama", vocab_size=16)
    head = fit_head(model)
    fast, general = make_generator(model, head=head), make_generator(model, head=head, backend="transformers")
    assert fast.backend == "fast" and general.backend == "transformers"
    for prompt in PROMPTS:
        ref = hf_greedy(model, prompt, 30)
        for tree in TREES[:2]:
            assert fast.generate(prompt, max_new_tokens=30, method=method, **tree).token_ids == ref
            assert general.generate(prompt, max_new_tokens=30, method=method, **tree).token_ids == ref


def test_batched_generation_equals_generate():
    model = make_tiny_model("qwen2", vocab_size=16, seed=1)
    prompts = [[1, 2, 3], list(range(16)) + [4], [5] * 9, [9, 8]]
    eos = {3}
    out = fast_generate(FastTarget(model), prompts, 12, eos)
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
