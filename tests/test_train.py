"""`eagle2 train` on a tiny random model: every stage, resumes, loss, export round trip, released format."""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import replace

import pytest
import torch
from conftest import ToyTokenizer, make_tiny_model

from eagle2.api import Eagle2Generator
from eagle2.draft_head import DraftHead, HeadConfig, init_head, rope_theta_of
from eagle2.train.corpus import Corpus
from eagle2.train.export import check_released_format, expected_keys, export_head
from eagle2.train.features import build_features
from eagle2.train.shards import covered_ids, load_shards, window_meta
from eagle2.train.pipeline import PipelineOptions, run_pipeline
from eagle2.train.responses import read_responses
from eagle2.train.trainer import TrainConfig, Trainer

VOCAB = 128


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and OpenMP waits on a busy shared CPU cost seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("llama", vocab_size=VOCAB, max_position_embeddings=512)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    with path.open("w") as f:
        for i in range(16):
            ids = [rng.randrange(VOCAB) for _ in range(rng.randrange(4, 16))]
            f.write(json.dumps({"id": i, "prompt": " ".join(map(str, ids))}) + "\n")
    return path


def _cfg(**kw):
    base = dict(lr=3e-3, epochs=3, batch_tokens=160, warmup_steps=2, eval_every=0, log_every=1, ckpt_minutes=60,
                eval_max_new_tokens=16, bf16=False)  # bf16 on tiny CPU shapes is slow (oneDNN setup)
    return TrainConfig(**{**base, **kw})


def _opts(run_dir, prompt_file, **kw):
    base = dict(run_dir=run_dir, prompts=(str(prompt_file),), dev_prompts=2, max_new_tokens=16, gen_batch_size=8,
                shard_size=8, progress=False, base_model="tiny-llama", train_cfg=_cfg())
    return PipelineOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tiny, prompt_file, tmp_path_factory):
    """responses + features once for the module (checks their resume on the way)."""
    run_dir = tmp_path_factory.mktemp("run")
    tok = ToyTokenizer()
    run_pipeline(tiny, tok, _opts(run_dir, prompt_file, stages=("responses", "features")))
    full = {r["id"]: r for r in _records(run_dir)}
    assert len(full) == 14  # 16 prompts - 2 held out for acceptance evaluation
    # an interrupted responses stage: 5 turns pending and half a line -> resumes, same answers
    cut = run_dir / "cut-corpus"
    c = Corpus(cut)
    for r in list(full.values())[:5]:
        c.add(r["id"], 0, r["prompt_ids"], r["response_ids"])
    with (cut / "pending.jsonl").open("a") as f:
        f.write('{"id": "prompts:9", "turn": 0, "pre')
    (run_dir / "features" / "shard-00001.safetensors").unlink()  # features lost: those records are redone
    run_pipeline(tiny, tok, _opts(run_dir, prompt_file, stages=("responses", "features"), corpus=cut))
    again = {r["id"]: r for r in Corpus(cut).records()}
    assert again.keys() == full.keys()
    assert all(again[k]["response_ids"] == full[k]["response_ids"] for k in full)
    shards = json.loads((cut / "manifest.json").read_text())["shards"]  # the 5 left pending, then the 9 new
    assert [(s["file"], s["turns"]) for s in shards] == [("turns-00000.jsonl.gz", 5), ("turns-00001.jsonl.gz", 9)]
    assert not (cut / "pending.jsonl").exists()
    assert len(load_shards(run_dir / "features")) == 14  # each record once, regenerated ones not twice
    held_out = {next(iter(full))}  # a prompt moved to the dev set later is not trained on
    assert len(load_shards(run_dir / "features", exclude=held_out)) == 13
    return run_dir


def _records(run_dir):
    return Corpus(run_dir / "corpus").records()


def test_responses_are_the_targets_greedy_answers(tiny, run):
    rec = _records(run)[0]
    ids = torch.tensor([rec["prompt_ids"]])
    ref = tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                        pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert rec["response_ids"] == ref


def test_features_are_target_hidden_states(tiny, run):
    exs = load_shards(run / "features")
    assert len(exs) == 14
    rec = _records(run)[0]
    full = rec["prompt_ids"] + rec["response_ids"]
    with torch.no_grad():
        h = tiny.model(torch.tensor([full])).last_hidden_state[0]  # [T, H] after the final norm
    e = exs[0]
    # captured while generating: the last generated token is never fed, so it may lack a feature
    assert len(full) - e.pos0 - 1 <= len(e.tokens) <= len(full) - e.pos0
    assert e.tokens.tolist() == full[e.pos0:e.pos0 + len(e.tokens)]
    assert e.pos0 == 0 and e.start == len(rec["prompt_ids"])  # the head sees the whole prompt, as at inference
    n = len(e.tokens)
    torch.testing.assert_close(e.hidden.float(), h[e.pos0:e.pos0 + n].to(torch.bfloat16).float(), atol=2e-2, rtol=1e-2)


def test_features_stage_fills_records_without_captured_features(tiny, run, tmp_path):
    """The features stage (a prefill over prompt + response) gives the features the responses stage
    captured while generating, up to bf16 rounding, and skips records that already have them."""
    run2 = tmp_path / "run"
    recs = _records(run)
    assert build_features(tiny, recs, run2 / "features", shard_size=8)["new_shards"] == 2
    assert build_features(tiny, recs, run2 / "features", shard_size=8)["new_shards"] == 0
    assert build_features(tiny, recs, run2 / "features", shard_size=8, context=4)["new_shards"] == 2  # other windows
    full = window_meta(None, 1024)
    recomputed, captured = load_shards(run2 / "features", window=full), load_shards(run / "features")
    assert len(recomputed) == len(captured) == 14
    by_key = {(tuple(e.tokens[:e.start + 1].tolist()), e.pos0): e for e in captured}
    for e in recomputed:
        c = by_key[(tuple(e.tokens[:e.start + 1].tolist()), e.pos0)]
        n = len(c.tokens)
        assert e.tokens[:n].tolist() == c.tokens.tolist() and len(e.tokens) - n in (0, 1)
        torch.testing.assert_close(c.hidden.float(), e.hidden[:n].float(), atol=2e-2, rtol=1e-2)


def test_unrolled_forward_is_the_inference_chain():
    """Training-time test: step k at position i equals the draft head run as the drafter runs it:
    commit true features up to i - k, then k steps on its own predictions (KV cache, no mask)."""
    from eagle2.train.trainer import unrolled_forward

    cfg = HeadConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     vocab_size=VOCAB)
    head = init_head(cfg, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    t = 12
    feats, emb = torch.randn(1, t, 32, generator=g), torch.randn(1, t, 32, generator=g)
    pos = torch.arange(t)[None] + 3
    with torch.no_grad():
        preds = unrolled_forward(head, feats, emb, pos, 4)
        plain, _ = head(feats, emb, pos)
        torch.testing.assert_close(preds[0], plain)
        for k in (1, 2, 3):
            for i in (k, 7, t - 1):
                c = i - k + 1  # committed entries 0 .. i - k
                out, (kc, vc) = head(feats[:, :c], emb[:, :c], pos[:, :c])
                f = out[:, -1:]
                for j in range(1, k + 1):
                    p = i - k + j
                    f, (kn, vn) = head(f, emb[:, p:p + 1], pos[:, p:p + 1], past=(kc, vc))
                    kc, vc = torch.cat([kc, kn], 2), torch.cat([vc, vn], 2)
                torch.testing.assert_close(preds[k][:, i], f[:, 0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(preds[2][:, 7], plain[:, 7], atol=1e-3)  # the chain really differs


def _saved_head(tiny, run, directory):
    """(examples, tokenizer, trainer) after 2 steps whose head is saved in ``directory``."""
    exs = load_shards(run / "features")
    tok = ToyTokenizer()
    first = Trainer(tiny, tok, exs, directory.parent / "a", _cfg(max_steps=2), progress=False)
    first.train()
    first.save_head(directory)
    return exs, tok, first


def test_ttt_training_and_warm_start(tiny, run, tmp_path):
    exs, tok, first = _saved_head(tiny, run, tmp_path / "h")
    tr = Trainer(tiny, tok, exs, tmp_path / "b", _cfg(max_steps=3, ttt_steps=3, init_head=str(tmp_path / "h")),
                 progress=False)
    for k, v in first.head.state_dict().items():  # warm start: the saved (bf16) weights
        torch.testing.assert_close(tr.head.state_dict()[k], v.to(torch.bfloat16).float())
    res = tr.train()
    rec = [h for h in res.history if "loss" in h][-1]
    assert "acc_1" in rec and "acc_2" in rec and 0 <= rec["acc_2"] <= 1
    with pytest.raises(ValueError, match="ttt_steps"):
        _cfg(ttt_steps=0)


def test_wider_head_warm_start_keeps_the_function(tiny, run, tmp_path):
    exs, tok, first = _saved_head(tiny, run, tmp_path / "h")
    narrow = DraftHead.load(tmp_path / "h").float()
    wide_i = 3 * narrow.config.intermediate_size
    tr = Trainer(tiny, tok, exs, tmp_path / "b", _cfg(max_steps=2, init_head=str(tmp_path / "h"),
                                                       head_intermediate=wide_i), progress=False)
    assert tr.head.config.intermediate_size == wide_i
    g = torch.Generator().manual_seed(0)
    h = tiny.config.hidden_size
    f, e = torch.randn(2, 9, h, generator=g), torch.randn(2, 9, h, generator=g)
    pos = torch.arange(9)[None].expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(tr.head(f, e, pos)[0], narrow(f, e, pos)[0], atol=1e-5, rtol=1e-5)
    tr.train()  # the new units learn: their down_proj columns leave zero
    down = tr.head.layers[0].mlp.down_proj.weight
    assert down[:, narrow.config.intermediate_size:].abs().sum() > 0
    tr.save_head(tmp_path / "wide")
    assert check_released_format(tmp_path / "wide") == []
    wide = DraftHead.load(tmp_path / "wide")
    assert wide.config.intermediate_size == wide_i
    prompt = [5, 17, 99, 3, 42, 7]
    res = Eagle2Generator(tiny, tok, wide).generate(prompt, max_new_tokens=12, method="eagle2")
    ids = torch.tensor([prompt])
    ref = tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                        pad_token_id=0)[0, len(prompt):].tolist()
    assert res.token_ids == ref  # the engine drafts with the wider MLP and stays exact
    with pytest.raises(ValueError, match="--head-intermediate"):  # a wider head cannot be narrowed
        Trainer(tiny, tok, exs, tmp_path / "c", _cfg(max_steps=1, init_head=str(tmp_path / "wide")), progress=False)


def test_sampled_responses_stage(tiny, prompt_file, tmp_path):
    run_pipeline(tiny, ToyTokenizer(), _opts(tmp_path / "s", prompt_file, stages=("responses",), temperature=5.0))
    sampled = {r["id"]: r["response_ids"] for r in _records(tmp_path / "s")}
    run_pipeline(tiny, ToyTokenizer(), _opts(tmp_path / "g", prompt_file, stages=("responses",)))
    greedy = {r["id"]: r["response_ids"] for r in _records(tmp_path / "g")}
    assert sampled.keys() == greedy.keys()
    assert sum(sampled[k] != greedy[k] for k in greedy) >= len(greedy) // 2  # a hot temperature changes answers


def test_schedule_steps_anneals_by_that_step(tiny, run, tmp_path):
    """--schedule-steps: the lr falls linearly from its peak after warm-up to lr x min_lr_ratio at that step,
    then stays there; without it the floor comes only at the end of the planned epochs."""
    exs = load_shards(run / "features")
    cfg = _cfg(schedule_steps=5, warmup_steps=1, min_lr_ratio=0.1)
    tr = Trainer(tiny, ToyTokenizer(), exs, tmp_path / "s", cfg, progress=False)
    assert tr.total_steps > 6  # the epochs alone would decay much later
    lrs = []
    for _ in range(7):
        lrs.append(tr.opt.param_groups[0]["lr"])
        tr.opt.step()
        tr.sched.step()
    assert lrs[1] == pytest.approx(cfg.lr)
    assert lrs[3] == pytest.approx(cfg.lr * (1 - 0.9 * 2 / 4))
    assert lrs[5] == pytest.approx(cfg.lr * 0.1) and lrs[6] == pytest.approx(cfg.lr * 0.1)
    plain = Trainer(tiny, ToyTokenizer(), exs, tmp_path / "p", _cfg(warmup_steps=1), progress=False)
    for _ in range(5):
        plain.opt.step()
        plain.sched.step()
    assert plain.opt.param_groups[0]["lr"] > 0.5 * cfg.lr


def test_train_resumes_exactly_and_loss_goes_down(tiny, run, tmp_path):
    exs = load_shards(run / "features")
    tok = ToyTokenizer()
    straight = Trainer(tiny, tok, exs, tmp_path / "a", _cfg(max_steps=6), progress=False)
    straight.train()
    first = Trainer(tiny, tok, exs, tmp_path / "b", _cfg(max_steps=3), progress=False)
    assert first.train().status == "stopped"
    second = Trainer(tiny, tok, exs, tmp_path / "b", _cfg(max_steps=6), progress=False)
    assert second.step == 3
    second.train()
    for k, v in straight.head.state_dict().items():
        assert torch.equal(v, second.head.state_dict()[k]), k
    ckpt = tmp_path / "b" / "ckpt.pt"
    for damage in (ckpt.read_bytes()[:1000], b""):  # cut short, emptied: named, not a torch traceback
        ckpt.write_bytes(damage)
        with pytest.raises(ValueError, match="ckpt.pt is damaged"):
            Trainer(tiny, tok, exs, tmp_path / "b", _cfg(max_steps=6), progress=False)
    # a fresh run of 6 epochs: the loss falls
    res = Trainer(tiny, tok, exs, tmp_path / "c", _cfg(epochs=12, lr=1e-2, noise=0.0), progress=False).train()
    assert res.status == "done"
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    assert all(0.0 <= h["acc"] <= 1.0 for h in res.history if "acc" in h)


def test_a_signal_stops_after_the_step_checkpoints_and_resumes_exactly(tiny, run, tmp_path):
    """SIGINT / SIGTERM while training: the step in flight completes, the checkpoint is written at once
    (ckpt_minutes is an hour here) and the run ends "interrupted"; rerunning continues bit-identically."""
    import os
    import signal

    exs = load_shards(run / "features")
    tok = ToyTokenizer()
    straight = Trainer(tiny, tok, exs, tmp_path / "a", _cfg(max_steps=5), progress=False)
    straight.train()
    for sig in (signal.SIGINT, signal.SIGTERM):
        d = tmp_path / f"s{int(sig)}"
        first = Trainer(tiny, tok, exs, d, _cfg(max_steps=5), progress=False)
        plain_loss = first.batch_loss

        def loss_then_signal(batch, sig=sig):
            out = plain_loss(batch)
            if first.step == 2:  # the third step's loss is computed, then the signal arrives
                os.kill(os.getpid(), sig)
            return out

        first.batch_loss = loss_then_signal
        # The trainer leaves an ignored signal ignored (a job started with `&` ignores SIGINT), so the test
        # gives the signal its default handling first, whatever shell started pytest.
        inherited = signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        try:
            before = signal.getsignal(sig)
            res = first.train()
            assert signal.getsignal(sig) is before  # the previous handler is back
        finally:
            signal.signal(sig, inherited)
        assert (res.status, res.step) == ("interrupted", 3)
        again = Trainer(tiny, tok, exs, d, _cfg(max_steps=5), progress=False)
        assert again.step == 3
        assert again.train().status == "stopped"
        for k, v in straight.head.state_dict().items():
            assert torch.equal(v, again.head.state_dict()[k]), (sig, k)


def test_train_export_load_generate_round_trip(tiny, run, prompt_file, tmp_path):
    tok = ToyTokenizer()
    out = tmp_path / "head"
    opts = _opts(run, prompt_file, stages=("train", "export"), out=out, train_cfg=_cfg(epochs=2, eval_every=4))
    with pytest.warns(UserWarning, match="fc.bias"):
        summary = run_pipeline(tiny, tok, opts)
    assert summary["train"]["best_tau"] >= 1.0  # acceptance was measured on the held-out prompts
    stats = json.loads((run / "stats.json").read_text())
    assert set(stats["stage_seconds"]) == {"responses", "features", "train", "export"}
    card = (out / "README.md").read_text()
    assert "tiny-llama" in card and "Hyperparameters" in card and "vLLM" in card and "tokens seen" in card
    assert "## Training corpus" in card and "| prompts | 14 | 0 | 14 |" in card  # from the corpus manifest
    assert "The corpus then held 14 conversations (14 turns" in card
    assert "Loss over the draft vocabulary" in card
    assert check_released_format(out) == []
    head = DraftHead.load(out)
    assert torch.equal(head.draft_vocab, DraftHead.load(run / "train" / "best").draft_vocab)  # the one trained over
    gen = Eagle2Generator(tiny, tok, head)
    prompt = [5, 17, 99, 3, 42, 7]
    res = gen.generate(prompt, max_new_tokens=20, method="eagle2")
    ids = torch.tensor([prompt])
    ref = tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                        pad_token_id=0)[0, len(prompt):].tolist()
    assert res.token_ids == ref
    assert res.stats.mean_accept_len >= 1.0


def test_loss_over_the_draft_vocabulary(tiny, run, tmp_path):
    """The soft-CE takes both distributions over the draft vocabulary's lm_head rows only (the
    target's renormalized over them); the other rows are never touched; saved heads carry the vocabulary."""
    from eagle2.train.trainer import collate, head_loss

    exs = load_shards(run / "features")
    vocab = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:48]
    tr = Trainer(tiny, ToyTokenizer(), exs, tmp_path / "v", _cfg(max_steps=3, noise=0.0, ttt_steps=1), progress=False,
                 vocab=vocab)
    assert tr.lm_w.shape == (48, tiny.config.hidden_size)
    batch = collate(exs[:3])
    w = tiny.lm_head.weight.detach()
    with torch.no_grad():
        _, m = head_loss(tr.head, tr.embed, tr.lm_w, batch, tr.cfg, None)
        h = batch["hidden"].float()
        pred = tr.head(h[:, :-1], tr.embed(batch["tokens"][:, 1:]).float(),
                       batch["pos0"][:, None] + torch.arange(h.shape[1] - 1)[None])[0]
        i = torch.arange(h.shape[1] - 1)[None]
        mask = (i + 1 >= batch["start"][:, None]) & (i + 1 < batch["lens"][:, None])
        p = (h[:, 1:][mask] @ w[vocab].T).softmax(-1)  # [N, 48] the target's distribution over the draft vocabulary
        ce = -(p * (pred[mask] @ w[vocab].T).log_softmax(-1)).sum(-1).mean()
    assert m["ce"] == pytest.approx(float(ce), rel=1e-4)
    # rows outside the draft vocabulary do not matter at all
    other = torch.ones(VOCAB, dtype=torch.bool)
    other[vocab] = False
    changed = make_tiny_model("llama", vocab_size=VOCAB, max_position_embeddings=512)
    with torch.no_grad():
        changed.lm_head.weight[other] = torch.randn(int(other.sum()), tiny.config.hidden_size)
    tr2 = Trainer(changed, ToyTokenizer(), exs, tmp_path / "v2", tr.cfg, progress=False, vocab=vocab)
    with torch.no_grad():
        assert head_loss(tr2.head, tr2.embed, tr2.lm_w, batch, tr2.cfg, None)[1]["ce"] == m["ce"]
    res = tr.train()
    assert res.step == 3 and all(h["ce"] < 5 for h in res.history if "ce" in h)
    assert DraftHead.load(tmp_path / "v" / "last").draft_vocab.tolist() == vocab.tolist()  # measured as shipped
    with pytest.raises(ValueError, match="loss vocabulary"):  # a checkpoint is resumed over its own vocabulary
        Trainer(tiny, ToyTokenizer(), exs, tmp_path / "v", tr.cfg, progress=False, vocab=vocab[:40])
    with pytest.raises(ValueError, match="loss vocabulary"):
        Trainer(tiny, ToyTokenizer(), exs, tmp_path / "v3", tr.cfg, progress=False, vocab=torch.tensor([VOCAB]))


def test_training_windows_hold_the_whole_prompt():
    """context None: the window starts at the first prompt token; max_len drops the oldest prompt
    tokens first (keeping one before the answer), then cuts the answer."""
    from eagle2.train.shards import windows

    rec = dict(prompt_ids=list(range(10, 16)), response_ids=[1, 2, 3, 4])  # prompt 6, answer 4
    assert windows([rec], None, 100) == [(rec["prompt_ids"] + rec["response_ids"], 0, 6)]
    assert windows([rec], 3, 100)[0][1:] == (3, 6)
    ids, s, p = windows([rec], None, 8)[0]
    assert (s, p, len(ids) - s) == (2, 6, 8)
    long = dict(prompt_ids=list(range(10, 16)), response_ids=list(range(12)))
    ids, s, p = windows([long], None, 8)[0]
    assert (s, p, len(ids) - s, ids[-1]) == (5, 6, 8, 6)  # one prompt token, then the first 7 answer tokens
    assert windows([dict(prompt_ids=[1, 2], response_ids=[3])], None, 100)[0][2] == -1  # nothing to learn


def test_corpus_round_trips_ids_and_import_is_idempotent(tmp_path):
    from eagle2.train.corpus import import_responses

    rng = random.Random(1)
    src = tmp_path / "responses.jsonl"
    recs = [dict(id=f"dolly15k_en:dolly-{i}", prompt_ids=[rng.randrange(49152) for _ in range(rng.randrange(1, 30))],
                 response_ids=[rng.randrange(49152) for _ in range(rng.randrange(0, 40))], response="x")
            for i in range(20)] + [dict(id="oasst1_en:7", prompt_ids=[0, 49151], response_ids=[65535, 0])]
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    c = Corpus(tmp_path / "c")
    assert import_responses(c, src, "m", {"temperature": 0.0}) == dict(added=21, skipped=0)
    assert import_responses(Corpus(tmp_path / "c"), src, "m", {"temperature": 0.0}) == dict(added=0, skipped=21)
    assert len(list((tmp_path / "c").glob("turns-*.jsonl.gz"))) == 1  # the second import wrote nothing
    back = Corpus(tmp_path / "c")
    assert [(r["id"], r["prompt_ids"], r["response_ids"]) for r in back.records()] == \
        [(r["id"], r["prompt_ids"], r["response_ids"]) for r in recs]
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["model"] == "m" and m["total"]["conversations"] == 21 and m["sources"]["oasst1_en"]["turns"] == 1
    assert m["total"]["response_tokens"] == sum(len(r["response_ids"]) for r in recs)
    # a later turn stores only what follows the earlier turns, and reads back whole
    first = back.conversations["oasst1_en:7"].ids_after(0)
    back.add("oasst1_en:7", 1, first + [5, 6], [9])
    back.add("oasst1_en:7", 2, first[:1] + [8], [4, 4])  # a template that does not extend: still exact
    with pytest.raises(ValueError, match="does not follow"):
        back.add("dolly15k_en:dolly-0", 2, [1], [2])
    back.seal("m", {"temperature": 0.0})
    again = Corpus(tmp_path / "c")
    turns = again.conversations["oasst1_en:7"].turns
    assert [t.prompt_ids for t in turns] == [[0, 49151], first + [5, 6], first[:1] + [8]]
    with gzip.open(tmp_path / "c" / "turns-00001.jsonl.gz", "rt") as f:
        assert json.loads(f.readline())["prompt_ids"] == [5, 6]  # prefix: the first turn is not stored again
    assert [r["id"] for r in again.records(only={"oasst1_en:7"})] == ["oasst1_en:7", "oasst1_en:7#1", "oasst1_en:7#2"]
    with pytest.raises(ValueError, match="holds answers of m"):
        again.check_model("other", {"temperature": 0.0})
    shard = tmp_path / "c" / "turns-00001.jsonl.gz"
    good = shard.read_bytes()
    for damage in (good[: len(good) // 2], b"hello\n", gzip.compress(b"garbage{\n")):  # cut, not gzip, not JSON
        shard.write_bytes(damage)
        with pytest.raises(ValueError, match="turns-00001.jsonl.gz.*damaged corpus shard"):
            Corpus(tmp_path / "c")
    shard.write_bytes(good)
    with pytest.raises(ValueError, match="temperature"):
        again.check_model("m", {"temperature": 0.7})
    (tmp_path / "c" / "manifest.json").unlink()  # whose answers these are is now unknown: refused, not adopted
    with pytest.raises(ValueError, match="2 shard.*no model in manifest.json"):
        Corpus(tmp_path / "c").check_model("other", {"temperature": 0.0})


def test_training_refuses_records_whose_features_were_lost(tiny, run, prompt_file, tmp_path):
    import shutil

    copy = tmp_path / "r"
    shutil.copytree(run, copy)
    (copy / "features" / "shard-00000.safetensors").unlink()
    with pytest.raises(ValueError, match="have no features"):
        run_pipeline(tiny, ToyTokenizer(), _opts(copy, prompt_file, stages=("train",)))


def test_second_run_generates_nothing(tiny, prompt_file, tmp_path, monkeypatch):
    from eagle2.train import responses

    opts = _opts(tmp_path / "r", prompt_file, stages=("responses",))
    first = run_pipeline(tiny, ToyTokenizer(), opts)["responses"]
    assert first["new"] == 14
    shards = sorted((tmp_path / "r" / "corpus").glob("turns-*"))

    def refuse(*a, **k):
        raise AssertionError("an answered prompt was generated again")

    monkeypatch.setattr(responses, "_answer", refuse)
    again = run_pipeline(tiny, ToyTokenizer(), opts)["responses"]
    assert again["new"] == 0 and again["done"] == 14
    assert sorted((tmp_path / "r" / "corpus").glob("turns-*")) == shards


def test_limit_samples_every_prompt_file(tmp_path):
    """--prompts A B --limit N takes a shuffled prefix of both files (not the head of A), and the
    held-out dev prompts never train."""
    from eagle2.train.pipeline import choose_prompts

    files = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": i, "prompt": f"{name} {i}"}) + "\n" for i in range(20)))
        files.append(str(path))
    train, dev, _ = choose_prompts(PipelineOptions(run_dir=tmp_path / "r", prompts=tuple(files), limit=10,
                                                   dev_prompts=4))
    first_words = [p.messages[-1]["content"].split()[0] for p in train]
    assert len(train) == 10 and set(first_words) == {"a", "b"}
    assert not {p.messages[-1]["content"] for p in dev} & {p.messages[-1]["content"] for p in train}


def test_a_base_model_conversation_has_one_bos():
    """Without a chat template the turns are one text: a tokenizer that adds BOS adds it once."""
    from eagle2.train.responses import encode_chat

    class WithBos:
        chat_template = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1] * add_special_tokens + [int(t) for t in text.split()]}

    turns = [{"role": "user", "content": "5 6"}, {"role": "assistant", "content": "7"}, {"role": "user", "content": "8"}]
    assert encode_chat(WithBos(), turns) == [1, 5, 6, 7, 8]


def test_multi_turn_is_conditioned_on_the_first_answer(tiny, tmp_path):
    """A second turn is asked after the target's own first answer (as MT-bench's second turns are)
    and trains as its own record with that whole conversation as its prompt."""
    data = tmp_path / "mt.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "turns": [f"{i} 7 8 9", f"3 {i} 4"] if i % 2 else [f"{i} 5"]})
                            + "\n" for i in range(1, 7)))
    opts = _opts(tmp_path / "r", data, stages=("responses", "features"), dev_prompts=0)
    r = run_pipeline(tiny, ToyTokenizer(), opts)["responses"]
    assert r["new"] == 9  # 6 first turns + 3 second turns
    c = Corpus(tmp_path / "r" / "corpus")
    conv = c.conversations["mt:q1"]
    assert len(conv.turns) == 2 and len(c.conversations["mt:q2"].turns) == 1
    t0, t1 = conv.turns
    assert t0.prompt_ids == [1, 7, 8, 9]
    assert t1.prompt_ids == [1, 7, 8, 9] + t0.response_ids + [3, 1, 4]  # the model's own first answer
    ids = torch.tensor([t1.prompt_ids])
    ref = tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                        pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert t1.response_ids == ref
    assert c.manifest["sources"]["mt"] == dict(conversations=6, multi_turn=3, turns=9, prompt_tokens=4 * 3 + 2 * 3 + 3 * 3,
                                               response_tokens=9 * 16)
    exs = load_shards(tmp_path / "r" / "features")
    assert len(exs) == 9 and max(e.start for e in exs) == len(t1.prompt_ids)  # turn 2 sees turn 1 as its prompt


def test_fixed_responses_stage(tiny, tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} 2 3", "answer": f"4 5 {i}"}) + "\n" for i in range(10)))
    run_pipeline(tiny, ToyTokenizer(), _opts(tmp_path / "r", data, stages=("responses",), fixed=True))
    recs = read_responses(tmp_path / "r" / "responses.jsonl")
    assert len(recs) == 8 and recs[0]["response_ids"] == [4, 5, 0] and recs[0]["prompt_ids"] == [0, 2, 3]


def test_streamed_features_match_cached(tiny, run, tmp_path):
    """--stream computes on the fly exactly what the features stage caches (same prefill)."""
    from eagle2.train.features import StreamedExamples

    build_features(tiny, _records(run), tmp_path / "features", shard_size=8, context=4)
    cached = load_shards(tmp_path / "features")
    streamed = StreamedExamples(tiny, _records(run), context=4)
    assert len(streamed) == len(cached) and streamed.lengths()[3] == len(cached[3].tokens)
    assert torch.equal(streamed[3].hidden, cached[3].hidden) and torch.equal(streamed[3].tokens, cached[3].tokens)


@pytest.mark.parametrize("family,bias", [("llama", True), ("llama", False), ("qwen2", True)])
def test_exported_layout_matches_eagle_vllm_sglang(family, bias, tmp_path):
    """Keys, shapes and config fields that the official EAGLE loader, vLLM's EagleLlamaForCausalLM
    (keys prefixed with ``model.``; q/k/v and gate/up stacked from these names) and SGLang read."""
    from safetensors.torch import load_file, save_file

    model = make_tiny_model(family, vocab_size=VOCAB)
    head = init_head(HeadConfig.from_target(model.config, bias=bias))
    src = head.save(tmp_path / "src")
    ctx = pytest.warns(UserWarning, match="fc.bias") if bias else _no_warning()
    with ctx:
        out = export_head(src, tmp_path / "out", {"base_model": family})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1 and cfg["bias"] is bias and cfg["torch_dtype"] == "bfloat16"
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
              "rms_norm_eps", "max_position_embeddings", "hidden_act"):
        assert cfg[k] == getattr(model.config, k), k
    assert cfg["rope_theta"] == rope_theta_of(model.config)
    state = load_file(str(out / "model.safetensors"))
    want = expected_keys(cfg)
    assert {k: tuple(v.shape) for k, v in state.items()} == want
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert not any(k.startswith("model.") or "input_layernorm" in k or k == "norm.weight" for k in state)
    assert ("fc.bias" in state) is bias
    if family == "qwen2":
        assert "layers.0.self_attn.q_proj.bias" in state
    # vLLM's naming: model.-prefixed, plus an embedding copy; our loader reads it back unchanged
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "config.json").write_text((out / "config.json").read_text())
    prefixed = {f"model.{k}": v for k, v in state.items()}
    prefixed["model.embed_tokens.weight"] = torch.zeros(VOCAB, cfg["hidden_size"], dtype=torch.bfloat16)
    save_file(prefixed, str(tmp_path / "vllm" / "model.safetensors"))
    back = DraftHead.load(tmp_path / "vllm").state_dict()
    for k, v in DraftHead.load(out).state_dict().items():
        assert torch.equal(back[k], v)
    assert check_released_format(tmp_path / "vllm") != []  # the released layout has no model. prefix


def test_cli_train_help_and_errors(capsys, tmp_path):
    from eagle2.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for stage in ("responses", "features", "train", "export", "--run-dir", "--stream", "--fixed-responses",
                  "--ttt-steps", "--init-head", "--ce-weight", "--head-intermediate", "--head-layers", "--new-layer-lr-scale", "--lookup-weight", "--tv-weight", "--temperature",
                  "--corpus", "--extra-corpus", "--max-len", "--full-vocab-loss", "whole prompt"):
        assert stage in text
    assert main(["train", "--stages", "responses,bogus"]) == 2
    assert "unknown stage" in capsys.readouterr().err
    assert main(["train", "--lr", "-1"]) == 2
    assert main(["train", "--ttt-steps", "0"]) == 2
    assert "ttt_steps" in capsys.readouterr().err
    assert main(["train", "--temperature", "-0.5"]) == 2
    assert "--temperature" in capsys.readouterr().err
    assert main(["train", "--temperature", "nan"]) == 2  # NaN is not < 0, and would reach the manifest
    assert "finite number" in capsys.readouterr().err
    assert main(["train", "--threads", "-1"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert main(["train", "--init-head", "/nonexistent/head"]) == 2  # before hours of earlier stages
    assert "not a head directory" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    for flag in ("--out", "--run-dir", "--corpus"):
        assert main(["train", flag, str(tmp_path / "f")]) == 2
        assert f"{flag} {tmp_path / 'f'} is a file" in capsys.readouterr().err
    assert main(["train", "--extra-corpus", str(tmp_path)]) == 2  # before the model loads
    assert f"--extra-corpus {tmp_path}: not a corpus" in capsys.readouterr().err
    assert main(["train", "--head-layers", "2"]) == 2  # an EAGLE-1/2 head has one layer
    assert "needs --arch eagle3" in capsys.readouterr().err
    assert main(["train", "--arch", "eagle3", "--head-layers", "0"]) == 2
    assert "head_layers must be >= 1" in capsys.readouterr().err
    assert main(["train", "--arch", "eagle3", "--new-layer-lr-scale", "10"]) == 2  # no layer is new
    assert "applies to new layers only" in capsys.readouterr().err
    assert main(["train", "--lookup-weight", "0.5"]) == 2
    assert "needs --arch eagle3" in capsys.readouterr().err
    assert main(["train", "--arch", "eagle3", "--lookup-weight", "-1"]) == 2
    assert "lookup_weight must be >= 0" in capsys.readouterr().err
    assert main(["train", "--tv-weight", "0.5"]) == 2
    assert "needs --arch eagle3" in capsys.readouterr().err
    assert main(["train", "--arch", "eagle3", "--tv-weight", "1.5"]) == 2
    assert "tv_weight must be in [0, 1]" in capsys.readouterr().err


def test_train_config_is_validated():
    with pytest.raises(ValueError):
        TrainConfig(grad_clip=0)
    with pytest.raises(Exception):
        replace(TrainConfig(), lr=-1.0)
    cfg = TrainConfig()
    with pytest.raises(Exception):
        cfg.lr = 1.0  # frozen


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_train_precision_auto_follows_the_hardware(tiny, run, tmp_path, monkeypatch, fast_bf16):
    """bf16=None (the default) autocasts only where bf16 is native: emulated bf16 made a CPU step 22x slower."""
    from eagle2 import models
    from eagle2.cli import main

    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: fast_bf16)
    tr = Trainer(tiny, ToyTokenizer(), load_shards(run / "features"), tmp_path / "t", _cfg(bf16=None), progress=False)
    assert tr.cfg.bf16 is fast_bf16
    with pytest.raises(SystemExit) as e:
        main(["train", "--train-precision", "nope"])
    assert e.value.code == 2


class _no_warning:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *a):
        return self._w.__exit__(*a)


def test_cli_corpus_import_and_show(tmp_path, capsys):
    from eagle2.cli import main

    src = tmp_path / "responses.jsonl"
    src.write_text(json.dumps({"id": "dolly15k_en:1", "prompt_ids": [1, 2], "response_ids": [3, 4, 5]}) + "\n")
    corpus = str(tmp_path / "c")
    assert main(["corpus", "import", str(src), "--corpus", corpus, "--note", "test"]) == 0
    assert '"added": 1' in capsys.readouterr().out
    assert main(["corpus", "show", "--corpus", corpus]) == 0
    assert "| dolly15k_en | 1 | 0 | 1 | 2 | 3 |" in capsys.readouterr().out
    assert main(["corpus", "import", str(src), "--corpus", corpus, "--model", "other"]) == 2  # another model's
    assert "holds answers of smollm2-135m" in capsys.readouterr().err
    assert main(["corpus", "import", str(tmp_path / "missing.jsonl"), "--corpus", corpus]) == 2
    capsys.readouterr()
    # a bad line anywhere in a file adds nothing, and the error names the line
    bad = tmp_path / "bad.jsonl"
    for second in ({"id": "dolly15k_en:3", "prompt_ids": [1], "response_ids": "x"},
                   {"id": "dolly15k_en:3", "prompt_ids": [1], "response_ids": [-1]},
                   {"id": "dolly15k_en:3", "prompt_ids": [], "response_ids": [1]}):
        bad.write_text(json.dumps({"id": "dolly15k_en:2", "prompt_ids": [1], "response_ids": [2]}) + "\n"
                       + json.dumps(second) + "\n")
        assert main(["corpus", "import", str(bad), "--corpus", corpus]) == 2
        assert f"{bad}:2:" in capsys.readouterr().err
    assert not (tmp_path / "c" / "pending.jsonl").exists()
    assert main(["corpus", "show", "--corpus", corpus]) == 0
    assert "| dolly15k_en | 1 | 0 | 1 | 2 | 3 |" in capsys.readouterr().out
    assert main(["corpus", "show", "--corpus", str(tmp_path / "nowhere")]) == 2
    assert "no corpus at" in capsys.readouterr().err
    assert main(["corpus", "import", str(src), "--corpus", corpus, "--temperature", "nan"]) == 2
    (tmp_path / "c" / "manifest.json").write_text("{")
    assert main(["corpus", "show", "--corpus", corpus]) == 2
    assert "manifest.json is not valid JSON" in capsys.readouterr().err


def test_corpus_first_seal_writes_the_model_before_any_shard(tmp_path, monkeypatch):
    """A seal cut short between shard and manifest never leaves shards whose model is unknown."""
    import eagle2.train.corpus as corpus_mod

    c = Corpus(tmp_path / "c")
    c.add("dolly15k_en:1", 0, [1, 2], [3])

    real = corpus_mod.os.replace

    def cut(src, dst):  # interrupted as the shard is put in place
        if "turns-" in str(dst):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(corpus_mod.os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        c.seal("m", {"temperature": 0.0})
    monkeypatch.undo()
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["model"] == "m"
    with pytest.raises(ValueError, match="holds answers of m"):
        Corpus(tmp_path / "c").check_model("other", {"temperature": 0.0})


def test_nothing_to_train_says_why(tiny, prompt_file, tmp_path):
    """Every prompt over --max-prompt-tokens: the run says so, instead of a bare "no examples"."""
    opts = _opts(tmp_path / "r", prompt_file, stages=("responses", "features", "train"), max_prompt_tokens=2)
    with pytest.raises(ValueError, match=r"nothing to train on: no answered turn of the 14 .*14 prompt turn\(s\) were "
                                         r"longer than --max-prompt-tokens 2"):
        run_pipeline(tiny, ToyTokenizer(), opts)
    with pytest.raises(ValueError, match="run the responses stage first"):
        run_pipeline(tiny, ToyTokenizer(), _opts(tmp_path / "s", prompt_file, stages=("train",)))


def test_prompt_files_of_unexpected_shapes(tmp_path):
    """A record whose turn is not text is skipped like any record without a usable prompt; a file that
    is no list of records, two prompts under one id, two files of one name or a file without a prompt
    are refused with the file named, before any model runs."""
    from eagle2.train.data import read_prompts
    from eagle2.train.pipeline import choose_prompts

    odd = [{"prompt": 123}, {"question": ["a"]}, {"instruction": None}, {"turns": [1, 2]}, {"turns": "ab"},
           {"conversations": "hi"}, {"conversations": ["hi"]}, {"messages": [{"role": "user", "content": ["x"]}]},
           {"prompt": "a lone \ud800 surrogate: no UTF-8, a tokenizer's TypeError"}]
    path = tmp_path / "odd.jsonl"  # written raw: a U+2028 inside a string is valid JSON, and one line
    path.write_text("\ufeff" + "".join(json.dumps(r) + "\n" for r in odd)
                    + json.dumps({"prompt": "fine\u2028too ✓"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [p.messages[-1]["content"] for p in read_prompts(path)] == ["fine\u2028too ✓"]
    bad = {"scalar.json": "42", "dup.jsonl": '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n',
           "binary.jsonl": b"\x8b\x08\x00"}
    for name, text in bad.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ValueError, match=rf"{name}: (neither a JSON list|records 0 and 1 .* same id '1'|not a UTF-8)"):
            read_prompts(tmp_path / name)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "odd.jsonl").write_text('{"prompt": "other"}\n{"prompt": "more"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    for files, why in (((path, tmp_path / "d" / "odd.jsonl"), "two prompt files named 'odd'"),
                       ((path, path), "two prompt files named 'odd'"), ((tmp_path / "empty.jsonl",), "holds no usable")):
        with pytest.raises(ValueError, match=why):
            choose_prompts(PipelineOptions(run_dir=tmp_path / "r", prompts=tuple(map(str, files))))
    (tmp_path / "again.jsonl").write_text('{"prompt": "other"}\n{"prompt": "new"}\n')  # "other" twice: asked once
    train, dev, _ = choose_prompts(PipelineOptions(run_dir=tmp_path / "r", prompts=(str(tmp_path / "d" / "odd.jsonl"),
                                                                                   str(tmp_path / "again.jsonl"))))
    assert sorted(p.messages[-1]["content"] for p in train + dev) == ["more", "new", "other"]


def test_stages_refuse_another_models_corpus(tiny, prompt_file, tmp_path):
    """The features and train stages read the corpus too: answers of another model, or token ids its
    tokenizer wrote beyond this target's vocabulary, are refused in one line instead of training on
    another text or failing in the embedding."""
    ids = [f"prompts:{i}" for i in range(16)]
    for name, model, top in (("other", "other-model", VOCAB - 1), ("wide", "tiny-llama", VOCAB + 5)):
        c = Corpus(tmp_path / name)
        for cid in ids:
            c.add(cid, 0, [1, 2, 3], [4, top, 5])
        c.seal(model, {"temperature": 0.0})
    with pytest.raises(ValueError, match="holds answers of other-model, not tiny-llama"):
        run_pipeline(tiny, ToyTokenizer(), _opts(tmp_path / "r", prompt_file, stages=("features",),
                                                 corpus=tmp_path / "other"))
    with pytest.raises(ValueError, match=rf"holds token id {VOCAB + 5} .*beyond the target's vocabulary of {VOCAB}"):
        run_pipeline(tiny, ToyTokenizer(), _opts(tmp_path / "r", prompt_file, stages=("features", "train"),
                                                 corpus=tmp_path / "wide"))


def test_cli_paths_that_cannot_be_written(tmp_path, capsys):
    """A directory that cannot be created is refused before the model loads, and an OS error (a path
    under a file, a read-only disk) or a file that is not text is one line, not a traceback."""
    from eagle2.cli import main

    (tmp_path / "f").write_text("")
    under_file = str(tmp_path / "f" / "sub")
    for flag in ("--run-dir", "--out", "--corpus"):
        assert main(["train", flag, under_file, "--model", "/nonexistent/model"]) == 2
        assert f"{flag} {under_file} cannot be created or written" in capsys.readouterr().err
    src = tmp_path / "responses.jsonl"
    src.write_text(json.dumps({"id": "dolly15k_en:1", "prompt_ids": [1, 2], "response_ids": [3]}) + "\n")
    assert main(["corpus", "import", str(src), "--corpus", under_file]) == 2
    assert capsys.readouterr().err.startswith("error: [Errno 20] Not a directory")
    (tmp_path / "gz.jsonl").write_bytes(gzip.compress(b"{}\n"))
    assert main(["corpus", "import", str(tmp_path / "gz.jsonl"), "--corpus", str(tmp_path / "c")]) == 2
    assert "gz.jsonl: not a responses JSONL (not UTF-8 text" in capsys.readouterr().err


def test_a_run_directory_belongs_to_one_target(tiny, prompt_file, tmp_path):
    """Feature shards and checkpoints are one target's: another target's run directory is refused
    (its shards held token ids beyond this target's vocabulary: an IndexError deep in training)."""
    with pytest.raises(ValueError, match="nothing to export"):
        run_pipeline(tiny, ToyTokenizer(), _opts(tmp_path / "r", prompt_file, stages=("export",)))
    with pytest.raises(ValueError, match="the run directory .* holds a run of tiny-llama, not other-model"):
        run_pipeline(tiny, ToyTokenizer(), _opts(tmp_path / "r", prompt_file, stages=("export",),
                                                 base_model="other-model"))
    (tmp_path / "r" / "stats.json").write_text('{"stage_seconds": {')  # cut while written (before it was atomic)
    with pytest.raises(ValueError, match="stats.json is not valid JSON .*delete it"):
        run_pipeline(tiny, ToyTokenizer(), _opts(tmp_path / "r", prompt_file, stages=("export",)))


def test_cli_corpus_finds_the_corpus_train_writes(tmp_path, capsys, monkeypatch):
    """Without --corpus, `eagle2 corpus` looks where `eagle2 train --model MODEL` keeps the corpus: in
    the run directory for a model that is not built in (not a new folder under the repo's corpus/)."""
    from eagle2.cli import main
    from eagle2.train.corpus import default_corpus_dir
    from eagle2.train.pipeline import default_run_dir

    monkeypatch.setenv("EAGLE2_CACHE", str(tmp_path))
    model = str(tmp_path / "my-model")
    c = Corpus(default_corpus_dir(model, default_run_dir(model)))
    c.add("dolly15k_en:1", 0, [1, 2], [3])
    c.seal(model, {"temperature": 0.0})
    assert c.path.is_relative_to(tmp_path)
    assert main(["corpus", "show", "--model", model]) == 0
    assert "| dolly15k_en | 1 | 0 | 1 | 2 | 1 |" in capsys.readouterr().out


def test_a_shard_replaced_by_another_corpus_is_refused(tmp_path):
    """A sealed shard is the one its seal recorded (sha256 in the manifest): another model's shard of the
    same name copied over it reads as valid records, so it is refused, not trained on."""
    for name, answer in (("a", [3]), ("b", [VOCAB + 9])):
        c = Corpus(tmp_path / name)
        c.add("dolly15k_en:1", 0, [1, 2], answer)
        c.seal(name, {"temperature": 0.0})
    assert Corpus(tmp_path / "a").records()[0]["response_ids"] == [3]
    shard = "turns-00000.jsonl.gz"
    (tmp_path / "a" / shard).write_bytes((tmp_path / "b" / shard).read_bytes())
    with pytest.raises(ValueError, match=f"{shard}: damaged corpus shard .*sha256"):
        Corpus(tmp_path / "a")


def test_an_extra_corpus_trains_beside_the_main_one(tiny, run, prompt_file, tmp_path):
    """--extra-corpus: a second corpus of the target's answers (here sampled) is read beside the main one;
    its records keep their own answers under their own names, the held-out prompts stay out of both, and the
    model card counts it."""
    import shutil

    from eagle2.train.export import model_card

    sampled = tmp_path / "tiny-t5"
    run_pipeline(tiny, ToyTokenizer(), _opts(tmp_path / "s", prompt_file, stages=("responses",), temperature=5.0,
                                             corpus=sampled))
    feat_dir = tmp_path / "r"
    shutil.copytree(run, feat_dir)
    out = run_pipeline(tiny, ToyTokenizer(), _opts(feat_dir, prompt_file, stages=("features",),
                                                   extra_corpora=(sampled,)))
    assert out["features"]
    shards = load_shards(feat_dir / "features")
    main = {r["id"]: r for r in _records(run)}
    extra = {r["id"]: r for r in Corpus(sampled).records()}
    assert extra.keys() == main.keys()  # the same 14 training prompts (2 held out in both)
    assert len(shards) == 28  # each answered twice: greedy in the main corpus, sampled in the extra one
    assert covered_ids(feat_dir / "features") == set(main) | {k + "@tiny-t5" for k in main}
    assert sum(extra[k]["response_ids"] != main[k]["response_ids"] for k in main) >= 7
    assert "The target model's own sampled (temperature 5.0) answers" in (sampled / "README.md").read_text()
    assert "The target model's own greedy answers" in (run / "corpus" / "README.md").read_text()
    shutil.rmtree(feat_dir / "train", ignore_errors=True)  # other tests' checkpoint trained on 14 examples
    run_pipeline(tiny, ToyTokenizer(), _opts(feat_dir, prompt_file, stages=("train",), extra_corpora=(sampled,),
                                             train_cfg=_cfg(max_steps=1)))
    st = json.loads((feat_dir / "stats.json").read_text())
    assert st["examples"] == 28
    assert st["corpus_extra"] == [dict(path=str(sampled), temperatures=[5.0], total=Corpus(sampled).summary()["total"])]
    card = model_card({"base_model": "tiny", "corpus": st["corpus"], "corpus_extra": st["corpus_extra"]})
    assert "Beside it: 14 conversations (14 turns," in card and f"`{sampled}`, answered at temperature 5.0" in card


def test_extra_corpora_are_refused_when_they_cannot_be_read_apart(tiny, run, prompt_file, tmp_path):
    other = tmp_path / "other"
    c = Corpus(other)
    c.add("prompts:0", 0, [1, 2, 3], [4, 5])
    c.seal("other-model", {"temperature": 1.0})
    cases = [((tmp_path / "none",), "not a corpus"), ((run / "corpus",), "the same as --corpus"),
             ((other, other), "given twice"), ((other,), "holds answers of other-model")]
    for extras, why in cases:
        with pytest.raises(ValueError, match=why):
            run_pipeline(tiny, ToyTokenizer(), _opts(run, prompt_file, stages=("features",), extra_corpora=extras))
    with pytest.raises(ValueError, match="cannot go with --fixed-responses"):
        run_pipeline(tiny, ToyTokenizer(), _opts(tmp_path / "f", prompt_file, stages=("features",), fixed=True,
                                                 extra_corpora=(run / "corpus",)))
