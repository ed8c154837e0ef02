"""`eagle2 train --arch eagle3` on a tiny random target: the diagonal TTT mask (hand-written), the
unrolled forward equal to the head run as the drafter runs it, three-layer features equal to
transformers' hidden_states, the loss as defined, a falling loss, and a trained head exported in
the official layout that reloads, keeps the fp32 contract and drafts with tau > 1."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import ToyTokenizer, cost_model, make_tiny_model

from eagle2.api import Eagle2Generator, load_head
from eagle2.eagle3_head import Eagle3Config, Eagle3Head, init_eagle3_head
from eagle2.lookup import copy_hits
from eagle2.train.eagle3 import (Eagle3Trainer, _labels, _loss_words, capture_features, copy_weights, eagle3_loss,
                                 feature_dir, ttt_forward, ttt_mask)
from eagle2.train.shards import load_shards
from eagle2.train.pipeline import PipelineOptions, run_pipeline
from eagle2.train.trainer import TrainConfig, collate
from test_train import VOCAB, one_thread, prompt_file  # noqa: F401  (fixtures: one CPU thread; 16 random prompts)

LAYERS, VD = 8, 64  # capture points [2, 4, 5]; draft vocabulary: half of the 128 tokens


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("llama", vocab_size=VOCAB, num_hidden_layers=LAYERS, max_position_embeddings=512)


def _cfg(**kw):
    base = dict(lr=1e-2, epochs=3, batch_tokens=256, warmup_steps=2, eval_every=0, log_every=1, ckpt_minutes=60,
                eval_max_new_tokens=16, bf16=False, ttt_steps=5, noise=0.0)
    return TrainConfig(**{**base, **kw})


def _opts(run_dir, prompt_file, **kw):
    base = dict(run_dir=run_dir, prompts=(str(prompt_file),), dev_prompts=2, max_new_tokens=24, gen_batch_size=8,
                shard_size=8, progress=False, base_model="tiny-llama", train_cfg=_cfg(), arch="eagle3",
                draft_vocab=VD)
    return PipelineOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tiny, prompt_file, tmp_path_factory):
    """responses + EAGLE-3 features once for the module."""
    run_dir = tmp_path_factory.mktemp("run")
    run_pipeline(tiny, ToyTokenizer(), _opts(run_dir, prompt_file, stages=("responses", "features")))
    assert not (run_dir / "features").exists()  # the EAGLE-1/2 features are not captured for eagle3
    return run_dir


def _head(seed=1, vocab=VOCAB, vd=16, layers=1):
    cfg = Eagle3Config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, vocab_size=vocab, draft_vocab_size=vd, num_layers=layers)
    return init_eagle3_head(cfg, seed=seed, draft_ids=torch.arange(vd) * 2).eval()


# ---- training-time test --------------------------------------------------------------------------
def test_ttt_mask_is_the_diagonal_one():
    want = torch.tensor([[1, 0, 0, 1, 0, 0, 1, 0, 0],
                         [1, 1, 0, 0, 1, 0, 0, 1, 0],
                         [1, 1, 1, 0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(ttt_mask(3, 2), want)
    assert torch.equal(ttt_mask(3, 0), want[:, :3])  # step 0: plain causal attention


@pytest.mark.parametrize("layers", [1, 2])
def test_ttt_forward_is_the_inference_chain(layers):
    """Step k at index i equals the head run as the drafter runs it: commit the true pairs 0..i
    (features, next token), then k steps on its own outputs through a KV cache (one per decoder
    layer); the decomposed attention equals attention under the full diagonal mask."""
    head = _head(layers=layers)
    g = torch.Generator().manual_seed(0)
    t = 12
    feats, emb = torch.randn(1, t, 96, generator=g), torch.randn(1, t, 32, generator=g)
    pos = torch.arange(t)[None] + 3
    with torch.no_grad():
        outs = ttt_forward(head, feats, emb, pos, 4)
        dense = ttt_forward(head, feats, emb, pos, 4, dense=True)
        for a, b in zip(outs, dense):
            torch.testing.assert_close(a[:, :t - 4], b[:, :t - 4], atol=1e-5, rtol=1e-5)
        plain, _ = head(feats[:, :-1], emb[:, 1:], pos[:, :-1])
        torch.testing.assert_close(outs[0][:, :-1], plain, atol=1e-5, rtol=1e-5)
        for k in (1, 2, 3):
            for i in (0, 5, t - 2 - k):
                out, past = head(feats[:, :i + 1], emb[:, 1:i + 2], pos[:, :i + 1])
                f = out[:, -1:]
                for j in range(1, k + 1):  # depth j: token x_{i+1+j} at position i + j
                    f, new = head(f, emb[:, i + 1 + j:i + 2 + j], pos[:, i:i + 1] + j, past=past)
                    past = [(torch.cat([kc, kn], 2), torch.cat([vc, vn], 2)) for (kc, vc), (kn, vn) in zip(past, new)]
                torch.testing.assert_close(outs[k][:, i], f[:, 0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(outs[2][:, 5], plain[:, 5], atol=1e-3)  # the chain really differs


# ---- features and loss ---------------------------------------------------------------------------
def test_features_are_three_hidden_states_and_the_final_one(tiny):
    seqs = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]
    got = capture_features(tiny, seqs, (2, 4, 5))
    for ids, rows in zip(seqs, got):
        with torch.no_grad():
            out = tiny.model(torch.tensor([ids]), output_hidden_states=True)
        want = torch.cat([out.hidden_states[i][0] for i in (2, 4, 5)] + [out.last_hidden_state[0]], -1)
        assert rows.shape == (len(ids), 4 * 32) and rows.dtype == torch.bfloat16
        torch.testing.assert_close(rows.float(), want.to(torch.bfloat16).float())


def test_loss_is_the_soft_ce_over_the_draft_vocabulary(tiny, run, tmp_path):
    exs = load_shards(feature_dir(run, tiny))
    assert exs and exs[0].hidden.shape[1] == 4 * 32
    vocab = torch.arange(0, VOCAB, 2)  # the even token ids
    tr = Eagle3Trainer(tiny, ToyTokenizer(), exs, tmp_path / "t", _cfg(ttt_steps=1), progress=False, vocab=vocab)
    assert tr.head.target_ids.tolist() == vocab.tolist() and tr.lm_w.shape == (len(vocab), 32)
    batch = collate(exs[:3])
    with torch.no_grad():
        _, m = eagle3_loss(tr.head, tr.embed, tr.lm_w, batch, steps=1)
        h = batch["hidden"].float()
        tok = batch["tokens"]
        out, _ = tr.head(h[:, :-1, :96], tiny.model.embed_tokens(tok[:, 1:]),
                         batch["pos0"][:, None] + torch.arange(h.shape[1] - 1)[None])
        p = (h[:, 1:, 96:] @ tiny.lm_head.weight[vocab].T).softmax(-1)  # the target's, over the draft vocab
        j = torch.arange(1, h.shape[1])[None]
        ok = (j + 1 >= batch["start"][:, None]) & (j + 1 < batch["lens"][:, None])
        ok[:, :-1] &= tok[:, 2:] % 2 == 0  # the next token is in the draft vocabulary
        ok[:, -1] = False
        ce = -(p[ok] * tr.head.logits(out[ok]).log_softmax(-1)).sum(-1).mean()
    assert m["ce"] == pytest.approx(float(ce), rel=1e-4) and m["tokens"] > 0


def test_lookup_weight_scales_the_positions_lookup_proposes(tiny, run, tmp_path):
    """--lookup-weight: label j's cross-entropy is weighted by copy_weights, lookup_weight where prompt lookup
    proposes the next token and 1 elsewhere; weight 1 is the plain loss and weight 0 drops those positions."""
    exs = load_shards(feature_dir(run, tiny))
    tr = Eagle3Trainer(tiny, ToyTokenizer(), exs, tmp_path / "t", _cfg(ttt_steps=1), progress=False)
    batch = collate(exs[:6])
    w = copy_weights(batch, 0.25)  # [B, T]
    for b, (n, s) in enumerate(zip(batch["lens"].tolist(), batch["start"].tolist())):
        hits = copy_hits(batch["tokens"][b, :n].tolist(), s)
        assert w[b, :n].tolist() == [0.25 if x else 1.0 for x in hits] and (w[b, n:] == 1).all()
    with torch.no_grad():
        p, ok, _ = _labels(tr.head, batch, tr.lm_w, None, torch.device("cpu"))  # [B, T, Vd], [B, T]
        out = ttt_forward(tr.head, batch["hidden"].float()[..., :96], tr.embed(batch["tokens"]).float(),
                          batch["pos0"][:, None] + torch.arange(batch["tokens"].shape[1])[None], 1)[0]
        t = batch["tokens"].shape[1]
        sel = ok[:, 1:]
        ce = -(p[:, 1:][sel] * tr.head.logits(out[:, : t - 1][sel]).log_softmax(-1)).sum(-1)  # [N]
        kept = (copy_weights(batch, 0.0)[:, 1:][sel] > 0)  # [N]
        assert 0 < int((~kept).sum()) < len(kept)  # the toy answers repeat themselves: some hits, not all
        m1 = eagle3_loss(tr.head, tr.embed, tr.lm_w, batch, steps=1)[1]
        m0 = eagle3_loss(tr.head, tr.embed, tr.lm_w, batch, steps=1, lookup_weight=0.0)[1]
        assert m1["ce"] == pytest.approx(float(ce.mean()), rel=1e-4)
        assert m0["ce"] == pytest.approx(float(ce[kept].mean()), rel=1e-4)


def test_tv_weight_mixes_in_the_total_variation(tiny, run, tmp_path):
    """--tv-weight w: the loss per label is (1 - w) soft cross-entropy + w (1 - sum min(p, q)), the chance a draft
    drawn from q is rejected at T = 1; w = 0 is the plain loss."""
    exs = load_shards(feature_dir(run, tiny))
    tr = Eagle3Trainer(tiny, ToyTokenizer(), exs, tmp_path / "t", _cfg(ttt_steps=1), progress=False)
    batch = collate(exs[:6])
    with torch.no_grad():
        p, ok, _ = _labels(tr.head, batch, tr.lm_w, None, torch.device("cpu"))  # [B, T, Vd], [B, T]
        out = ttt_forward(tr.head, batch["hidden"].float()[..., :96], tr.embed(batch["tokens"]).float(),
                          batch["pos0"][:, None] + torch.arange(batch["tokens"].shape[1])[None], 1)[0]
        t, sel = batch["tokens"].shape[1], ok[:, 1:]
        logq = tr.head.logits(out[:, : t - 1][sel]).log_softmax(-1)  # [N, Vd]
        pk = p[:, 1:][sel]
        ce = float(-(pk * logq).sum(-1).mean())
        tv = float((1 - torch.minimum(pk, logq.exp()).sum(-1)).mean())
        assert 0 < tv < 1
        for w in (0.0, 0.5, 1.0):
            loss, m = eagle3_loss(tr.head, tr.embed, tr.lm_w, batch, steps=1, tv_weight=w)
            assert float(loss) == pytest.approx((1 - w) * ce + w * tv, rel=1e-4)
            assert m["ce"] == pytest.approx(ce, rel=1e-4)  # the metric stays the cross-entropy
    assert _loss_words(0.0) == "soft cross-entropy against" and "0.5 x total variation" in _loss_words(0.5)


def test_streamed_batches_are_the_cached_features(tiny, run, tmp_path):
    """--stream --arch eagle3: one padded forward per training step gives each example the features
    the shards hold, and training on them gives the weights training on the shards gives."""
    from eagle2.train.eagle3 import features_fn
    from eagle2.train.features import StreamedExamples

    cached = load_shards(feature_dir(run, tiny))
    recs = run_pipeline.__globals__["Corpus"](run / "corpus").records()
    streamed = StreamedExamples(tiny, recs, features=features_fn(tiny, on_device=True))
    assert len(streamed) == len(cached) and streamed.lengths() == [len(e.tokens) for e in cached]
    idx = [5, 0, 3]  # unequal lengths: padded together
    for i, ex in zip(idx, streamed.batch(idx)):
        assert torch.equal(ex.tokens, cached[i].tokens) and (ex.start, ex.pos0) == (cached[i].start, cached[i].pos0)
        torch.testing.assert_close(ex.hidden.float(), cached[i].hidden.float(), atol=2e-2, rtol=2e-2)
    a = Eagle3Trainer(tiny, ToyTokenizer(), cached, tmp_path / "a", _cfg(max_steps=3), progress=False)
    b = Eagle3Trainer(tiny, ToyTokenizer(), streamed, tmp_path / "b", _cfg(max_steps=3), progress=False)
    a.train(), b.train()
    for (k, wa), wb in zip(a.head.state_dict().items(), b.head.state_dict().values()):
        torch.testing.assert_close(wa, wb, atol=2e-3, rtol=2e-3, msg=k)


def test_a_few_steps_reduce_the_loss_and_resume_exactly(tiny, run, tmp_path):
    exs = load_shards(feature_dir(run, tiny))
    tok = ToyTokenizer()
    res = Eagle3Trainer(tiny, tok, exs, tmp_path / "a", _cfg(epochs=25), progress=False).train()
    losses = [h["loss"] for h in res.history if "loss" in h]
    class _All:  # every token in the draft vocabulary: the labels' entropy is the floor of the loss
        t2d = torch.ones(VOCAB, dtype=torch.bool)
    p, ok, _ = _labels(_All, collate(exs), tiny.lm_head.weight, None, "cpu")
    floor = float(-(p * p.log()).sum(-1)[ok].mean())
    assert sum(losses[-3:]) / 3 - floor < 0.6 * (sum(losses[:3]) / 3 - floor), (floor, losses)
    assert all(f"acc_{k}" in res.history[-2] for k in range(1, 5)) and "l1" not in res.history[-2]
    straight = Eagle3Trainer(tiny, tok, exs, tmp_path / "b", _cfg(max_steps=4), progress=False)
    straight.train()
    Eagle3Trainer(tiny, tok, exs, tmp_path / "c", _cfg(max_steps=2), progress=False).train()
    again = Eagle3Trainer(tiny, tok, exs, tmp_path / "c", _cfg(max_steps=4), progress=False)
    assert again.step == 2
    again.train()
    for k, v in straight.head.state_dict().items():
        assert torch.equal(v, again.head.state_dict()[k]), k


def test_accuracy_counts_answer_tokens_outside_the_draft_vocabulary_as_misses(tiny, run, tmp_path):
    """acc_k is hits over every answer position, as drafting sees it: a head drafting over a quarter of
    the tokens can match at most the answer positions whose next token it has."""
    exs = load_shards(feature_dir(run, tiny))
    tr = Eagle3Trainer(tiny, ToyTokenizer(), exs, tmp_path / "q", _cfg(max_steps=0), progress=False,
                       vocab=torch.arange(0, VOCAB, 4))
    batch = collate(exs)
    with torch.no_grad():
        _, m = eagle3_loss(tr.head, tr.embed, tr.lm_w, batch, steps=2)
        p, ok, answer = _labels(tr.head, batch, tr.lm_w, None, "cpu")
        hidden = batch["hidden"].float()
        positions = batch["pos0"][:, None] + torch.arange(hidden.shape[1])[None]
        outs = ttt_forward(tr.head, hidden[..., : 3 * (hidden.shape[-1] // 4)], tr.embed(batch["tokens"]).float(),
                           positions, 2)
    assert bool((answer & ~ok).any())  # some answer tokens are outside the vocabulary
    for k, name in ((0, "acc"), (1, "acc_1")):
        t = hidden.shape[1]
        pred = tr.head.logits(outs[k][:, : t - 1 - k]).argmax(-1)  # [B, T - 1 - k]
        hits = ((pred == p[:, 1 + k:].argmax(-1)) & ok[:, 1 + k:]).sum()
        assert m[name] == pytest.approx(float(hits / answer[:, 1 + k:].sum()))
        assert m[name] <= float(ok[:, 1 + k:].sum() / answer[:, 1 + k:].sum())


# ---- the whole path --------------------------------------------------------------------------------
def test_trained_head_exports_reloads_keeps_the_contract_and_drafts(tiny, run, prompt_file, tmp_path):
    from safetensors.torch import load_file
    from test_eagle3 import SERVING_CONFIG, official_shapes

    out = tmp_path / "head"
    opts = _opts(run, prompt_file, stages=("train", "export"), out=out, train_cfg=_cfg(epochs=40, lr=5e-3))
    summary = run_pipeline(tiny, ToyTokenizer(), opts)
    assert summary["train"]["best_tau"] >= 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert {k for k in cfg if not k.startswith("eagle2_")} - {"target_model_type"} == SERVING_CONFIG
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == VD
    head = load_head(out)
    assert isinstance(head, Eagle3Head)
    state = load_file(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == official_shapes(head.config)
    card = (out / "README.md").read_text()
    assert "EAGLE-3 draft head for tiny-llama" in card and "## Training corpus" in card and "eagle3" in card
    assert f"optimizer step {cfg['eagle2_train_step']}." in card and "over 5 steps" in card  # the exported weights' step
    assert "| noise |" not in card and "| ttt_steps | 5 |" in card  # only the hyperparameters an EAGLE-3 run uses
    # A fixed cost model: the tree's size then depends on the head alone, not on how busy the machine was
    # while a timing probe ran (a loaded machine made the trees, and so tau, smaller).
    gen = Eagle2Generator(tiny, ToyTokenizer(), head, cost_model=cost_model(0.1, level_ms=0.1))
    taus = []
    for rec in [r for r in run_pipeline.__globals__["Corpus"](run / "corpus").records()][:6]:
        prompt = rec["prompt_ids"]
        r = gen.generate(prompt, max_new_tokens=16, method="eagle2")
        ids = torch.tensor([prompt])
        ref = tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                            pad_token_id=0)[0, len(prompt):].tolist()
        assert r.token_ids == ref  # greedy == transformers, fp32
        taus.append(r.stats.mean_accept_len)
    assert sum(taus) / len(taus) > 1.3, taus  # drafts are accepted on the data it was fitted to


def test_cli_train_arch(capsys):
    from eagle2.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--arch" in text and "eagle3" in text and "diagonal mask" in text
    with pytest.raises(SystemExit):
        main(["train", "--arch", "eagle4"])


def test_a_larger_draft_vocab_widens_an_init_head_keeping_its_trained_rows(tiny, run, tmp_path):
    """--init-head with a larger --draft-vocab keeps every trained row (moved to its new draft id) and
    adds the most frequent missing tokens as zero rows; a smaller one keeps the head's vocabulary."""
    exs = load_shards(feature_dir(run, tiny))
    tok = ToyTokenizer()
    small = Eagle3Trainer(tiny, tok, exs, tmp_path / "s", _cfg(max_steps=2), progress=False,
                          vocab=torch.arange(1, VOCAB, 4))  # 32 tokens
    small.train()
    src_dir = small.save_head(tmp_path / "src", None)
    src = Eagle3Head.load(src_dir)
    wanted = torch.arange(VOCAB).flip(0)[:48]  # most frequent first: 127, 126, ...
    wide = Eagle3Trainer(tiny, tok, exs, tmp_path / "w", _cfg(max_steps=0, init_head=str(src_dir)),
                         progress=False, vocab=wanted)
    ids = wide.head.target_ids.tolist()
    assert len(ids) == 48 and set(src.target_ids.tolist()) <= set(ids) and ids == sorted(ids)
    kept = set(src.target_ids.tolist())
    assert set(ids) - kept == set([t for t in wanted.tolist() if t not in kept][:16])  # the most frequent new ones
    h = torch.randn(5, 32)
    old, new = src.float().logits(h), wide.head.float().logits(h)  # [5, 32], [5, 48]
    at = torch.tensor([ids.index(t) for t in src.target_ids.tolist()])
    torch.testing.assert_close(new[:, at], old, rtol=0, atol=1e-5)  # both read the same saved weights
    rest = torch.tensor([i for i in range(48) if i not in set(at.tolist())])
    assert torch.equal(new[:, rest], torch.zeros(5, 16))
    same = Eagle3Trainer(tiny, tok, exs, tmp_path / "k", _cfg(max_steps=0, init_head=str(src_dir)),
                         progress=False, vocab=wanted[:8])
    assert torch.equal(same.head.target_ids, src.target_ids)


def _init_head_run(tiny, run, tmp_path):
    """The cached examples and a head trained two steps and saved: the --init-head of a resized run."""
    exs = load_shards(feature_dir(run, tiny))
    first = Eagle3Trainer(tiny, ToyTokenizer(), exs, tmp_path / "a", _cfg(max_steps=2), progress=False)
    first.train()
    src_dir = first.save_head(tmp_path / "src", None)
    return exs, src_dir, Eagle3Head.load(src_dir).float()


def _assert_same_function(head: Eagle3Head, src: Eagle3Head, h: int) -> None:
    g = torch.Generator().manual_seed(0)
    feats, emb = torch.randn(2, 7, 3 * h, generator=g), torch.randn(2, 7, h, generator=g)
    pos = torch.arange(7)[None].expand(2, -1)
    with torch.no_grad():
        out, out_src = head.float()(feats, emb, pos)[0], src(feats, emb, pos)[0]
        torch.testing.assert_close(head.logits(out), src.logits(out_src), atol=1e-5, rtol=1e-5)


def _assert_drafts_exactly(tiny, head) -> None:
    prompt = [5, 17, 99, 3, 42, 7]
    res = Eagle2Generator(tiny, ToyTokenizer(), head).generate(prompt, max_new_tokens=12, method="eagle2")
    ids = torch.tensor([prompt])
    ref = tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                        pad_token_id=0)[0, len(prompt):].tolist()
    assert res.token_ids == ref


def test_a_wider_mlp_widens_an_init_head_keeping_its_function(tiny, run, tmp_path):
    """--head-intermediate on an EAGLE-3 run: the starting head's MLP is widened with silent new units (same
    logits), training moves them, and the export keeps the official layout with the wider intermediate_size,
    which the engine drafts with exactly. A head wider than the run's is refused."""
    exs, src_dir, src = _init_head_run(tiny, run, tmp_path)
    tok = ToyTokenizer()
    wide_i = 2 * src.config.intermediate_size
    tr = Eagle3Trainer(tiny, tok, exs, tmp_path / "b", _cfg(max_steps=3, init_head=str(src_dir),
                                                            head_intermediate=wide_i), progress=False)
    assert tr.head.config.intermediate_size == wide_i
    _assert_same_function(tr.head, src, tiny.config.hidden_size)
    tr.train()
    down = tr.head.midlayer.mlp.down_proj.weight
    assert down[:, src.config.intermediate_size:].abs().sum() > 0  # the new units learned
    wide_dir = tr.save_head(tmp_path / "wide", None)
    assert json.loads((wide_dir / "config.json").read_text())["intermediate_size"] == wide_i
    _assert_drafts_exactly(tiny, load_head(wide_dir))
    with pytest.raises(ValueError, match="--head-intermediate"):
        Eagle3Trainer(tiny, tok, exs, tmp_path / "c", _cfg(max_steps=0, init_head=str(wide_dir)), progress=False)


def test_a_deeper_head_starts_as_its_init_head_and_drafts_exactly(tiny, run, tmp_path):
    """--head-layers on an EAGLE-3 run: the starting one-layer head gains a decoder layer that starts as the
    identity (same logits), training moves it, the export says num_hidden_layers 2 and reloads with its
    ``layers.0.*`` weights, and the engine drafts with it exactly. A deeper head than the run's is refused."""
    exs, src_dir, src = _init_head_run(tiny, run, tmp_path)
    tok = ToyTokenizer()
    tr = Eagle3Trainer(tiny, tok, exs, tmp_path / "b", _cfg(max_steps=3, init_head=str(src_dir), head_layers=2),
                       progress=False)
    assert tr.head.config.num_layers == 2 and len(tr.head.layers) == 1
    _assert_same_function(tr.head, src, tiny.config.hidden_size)
    tr.train()
    assert tr.head.layers[0].mlp.down_proj.weight.abs().sum() > 0  # the new layer learned
    deep_dir = tr.save_head(tmp_path / "deep", None)
    assert json.loads((deep_dir / "config.json").read_text())["num_hidden_layers"] == 2
    deep = load_head(deep_dir)
    assert deep.config.num_layers == 2 and "layers.0.self_attn.q_proj.weight" in deep.state_dict()
    _assert_drafts_exactly(tiny, deep)
    with pytest.raises(ValueError, match="--head-layers 2"):
        Eagle3Trainer(tiny, tok, exs, tmp_path / "c", _cfg(max_steps=0, init_head=str(deep_dir)), progress=False)


def test_new_layers_of_a_deepened_head_train_at_their_own_lr(tiny, run, tmp_path):
    """--new-layer-lr-scale: the decoder layer the init head lacks trains at that multiple of the lr, through
    the whole schedule; every weight the init head had keeps the base lr."""
    exs, src_dir, _ = _init_head_run(tiny, run, tmp_path)
    cfg = _cfg(max_steps=2, init_head=str(src_dir), head_layers=2, new_layer_lr_scale=10.0)
    tr = Eagle3Trainer(tiny, ToyTokenizer(), exs, tmp_path / "b", cfg, progress=False)
    lr_of = {id(p): g["initial_lr"] for g in tr.opt.param_groups for p in g["params"]}
    for name, p in tr.head.named_parameters():
        assert lr_of[id(p)] == pytest.approx(cfg.lr * (10.0 if name.startswith("layers.0.") else 1.0)), name
    tr.train()
    by_scale = {round(g["initial_lr"] / cfg.lr): g["lr"] for g in tr.opt.param_groups}
    assert by_scale[10] == pytest.approx(10 * by_scale[1])  # the schedule scales both alike
    with pytest.raises(ValueError, match="grouped the head's parameters"):  # resumed without the scale
        Eagle3Trainer(tiny, ToyTokenizer(), exs, tmp_path / "b", replace(cfg, new_layer_lr_scale=1.0), progress=False)
