"""EAGLE-3 heads: tiny random checkpoints written here in the official layout (config.json +
pytorch_model.bin / model.safetensors, keys and shapes from docs/eagle3.md) load and keep the
fp32 contract (greedy == transformers) on the general and the lean target path; d2t maps draft
ids to token ids; heads that do not fit are refused with the differences spelled out; our export
carries exactly the keys and config fields SGLang and vLLM read. Wrong capture layers or a wrong
d2t change the drafts (so these tests can fail)."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from eagle2 import native as native_ext
from eagle2.api import Eagle2Generator, load_head
from eagle2.config import Backend
from eagle2.eagle3_head import (Eagle3Config, Eagle3Head, default_layers, init_eagle3_head, is_eagle3,
                                layers_from_config_ids, vocab_maps)

from conftest import ToyTokenizer, make_tiny_model
from test_engine import PROMPTS, TREES, hf_greedy

FAMILIES = ["llama", "qwen2", "mistral", "gemma3"]
LEAN = ["llama", "qwen2"]  # the families fast.py runs (Mistral's window and Gemma 3 stay on transformers)
N_LAYERS = 8  # default capture points [2, 4, 5]
H, V, VD = 32, 16, 12

# What SGLang (LlamaForCausalLMEagle3.load_weights, llama_eagle3.py) and vLLM (Eagle3LlamaForCausalLM.load_weights,
# llama_eagle3.py) read: fc, midlayer.* (vLLM renames it layers.0.*; q/k/v and gate/up fused on load), norm, lm_head,
# d2t (SGLang: hot_token_id = d2t + arange; vLLM: draft_id_to_target_id); both skip t2d (``official_shapes``).
# config.json fields they read: SGLang's LlamaConfig + draft_vocab_size, bias (fc), tie_word_embeddings, eagle_config;
# vLLM's: draft_vocab_size, attention_bias / bias (it adds q/k/v/o biases for either), mlp_bias, norm_before_residual,
# eagle_config.use_aux_hidden_state, eagle_aux_hidden_state_layer_ids (only written when not the default).
SERVING_CONFIG = {"architectures", "model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "num_hidden_layers", "vocab_size", "draft_vocab_size", "rope_theta",
                  "rms_norm_eps", "hidden_act", "max_position_embeddings", "bias", "attention_bias", "mlp_bias",
                  "norm_before_residual", "tie_word_embeddings", "torch_dtype", "eagle_config"}


def tiny_target(family: str):
    extra = {"layer_types": ["sliding_attention"] * (N_LAYERS - 1) + ["full_attention"]} if family == "gemma3" else {}
    return make_tiny_model(family, vocab_size=V, num_hidden_layers=N_LAYERS, **extra)


def greedy_text(model, seed: int = 0, n: int = 4, length: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, V, (n, 4), generator=g)
    with torch.no_grad():
        return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=length,
                              do_sample=False, pad_token_id=0)


def frequent_ids(ids: torch.Tensor, k: int = VD) -> torch.Tensor:
    """The k most frequent tokens (ties by id), as the official trainer picks its draft vocabulary."""
    counts = torch.bincount(ids.flatten(), minlength=V).float() - torch.arange(V) * 1e-3
    return counts.topk(k).indices.sort().values


def fit_eagle3(model, steps: int = 40, seed: int = 0, layers: int = 1) -> Eagle3Head:
    """A head fitted in a second to the model's greedy text: step 0 only, (f_t, x_{t+1}) -> x_{t+2},
    CE against the target's distribution over the draft vocabulary (the 12 most frequent tokens).
    Features come from transformers' own ``hidden_states`` at the default points, not from our
    capture code."""
    ids = greedy_text(model, seed)
    draft_ids = frequent_ids(ids)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        feats = torch.cat([out.hidden_states[i] for i in default_layers(N_LAYERS)], dim=-1)[:, :-2]  # f_t
        emb = model.get_input_embeddings()(ids[:, 1:-1])  # x_{t+1}
        p = torch.softmax(out.logits[:, 1:-1][..., draft_ids], dim=-1)  # the target's x_{t+2}, draft vocab
    pos = torch.arange(feats.shape[1])[None].expand(feats.shape[0], -1)
    head = init_eagle3_head(replace(Eagle3Config.from_target(model.config, VD), num_layers=layers), seed, draft_ids)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    head.train()
    for _ in range(steps):
        h, _ = head(feats, emb, pos)
        loss = -(p * torch.log_softmax(head.logits(h), dim=-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def official_shapes(cfg: Eagle3Config) -> dict:
    """Keys and shapes of the official layout (docs/eagle3.md), for a head with this config."""
    h, hd, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    a, m = "midlayer.self_attn.", "midlayer.mlp."
    return {"fc.weight": (h, 3 * h), "midlayer.input_layernorm.weight": (h,), "midlayer.hidden_norm.weight": (h,),
            "midlayer.post_attention_layernorm.weight": (h,), a + "q_proj.weight": (q, 2 * h),
            a + "k_proj.weight": (kv, 2 * h), a + "v_proj.weight": (kv, 2 * h), a + "o_proj.weight": (h, q),
            m + "gate_proj.weight": (i, h), m + "up_proj.weight": (i, h), m + "down_proj.weight": (h, i),
            "norm.weight": (h,), "lm_head.weight": (cfg.draft_vocab_size, h), "d2t": (cfg.draft_vocab_size,),
            "t2d": (cfg.vocab_size,)}


def write_official(directory, head: Eagle3Head, fmt: str = "bin", config_extra: dict | None = None):
    """A checkpoint as the official trainer ships it: a 591-byte-style config (LlamaForCausalLM,
    draft_vocab_size, no rope_theta) and keys with no prefix; pytorch_model.bin or safetensors."""
    cfg = head.config
    config = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
              "hidden_size": cfg.hidden_size, "initializer_range": 0.02, "intermediate_size": cfg.intermediate_size,
              "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": cfg.num_attention_heads,
              "num_key_value_heads": cfg.num_key_value_heads, "num_hidden_layers": 1, "pad_token_id": 0,
              "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": False, "torch_dtype": "float16",
              "transformers_version": "4.28.1", "use_cache": True, "vocab_size": cfg.vocab_size,
              "draft_vocab_size": cfg.draft_vocab_size, **(config_extra or {})}
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        config["head_dim"] = cfg.head_dim
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    state = {k: v.detach().clone().contiguous() for k, v in head.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == official_shapes(cfg)  # our module names = the official keys
    if fmt == "bin":  # as shipped: an fp16 pickle with int64 d2t and bool t2d
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
                   directory / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(directory / "model.safetensors"))
    return directory


def generator(model, head, backend="transformers", **kw):
    return Eagle2Generator(model, ToyTokenizer(), head, backend=backend, **kw)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, target, head loaded from an official-layout checkpoint written by this test)."""
    model = tiny_target(request.param)
    directory = write_official(tmp_path_factory.mktemp(f"eagle3-{request.param}"), fit_eagle3(model))
    head = load_head(directory)
    assert isinstance(head, Eagle3Head)
    refs = {tuple(p): hf_greedy(model, p, 24) for p in PROMPTS}  # transformers' greedy, 24 new tokens
    return request.param, model, head, refs


# ---- the contract --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["transformers", "fast"])
def test_greedy_equals_transformers(family, backend):
    name, model, head, refs = family
    if backend == "fast" and name not in LEAN:
        pytest.skip(f"{name} has no lean forward")
    gen = generator(model, head, backend)
    assert gen.backend.forward == backend and gen.target.feature_layers == (2, 4, 5)
    taus = []
    for prompt in PROMPTS:
        for method, tree in (("eagle2", TREES[0]), ("eagle2", TREES[1]), ("eagle1", TREES[0])):
            r = gen.generate(prompt, max_new_tokens=24, method=method, **tree)
            assert r.token_ids == refs[tuple(prompt)], f"{name} {backend} {method} {tree} prompt={prompt}"
            taus.append(r.stats.mean_accept_len)
    assert max(taus) > 1.5, f"{name}: EAGLE-3 drafts were rarely accepted ({max(taus):.2f})"


@pytest.mark.parametrize("backend", ["transformers", "fast"])
def test_a_deeper_head_keeps_the_contract(backend, tmp_path):
    """A two-layer head (this project's extension of the layout: ``layers.0.*`` after the midlayer) saved,
    reloaded and run: greedy output still equals transformers' token for token, and it drafts."""
    model = tiny_target("llama")
    head = fit_eagle3(model, layers=2)
    loaded = load_head(head.save(tmp_path / "deep", n_layers=N_LAYERS))
    assert loaded.config.num_layers == 2
    gen = generator(model, loaded, backend)
    taus = []
    for prompt in PROMPTS:
        r = gen.generate(prompt, max_new_tokens=24, method="eagle2", **TREES[0])
        assert r.token_ids == hf_greedy(model, prompt, 24), f"{backend} prompt={prompt}"
        taus.append(r.stats.mean_accept_len)
    assert max(taus) > 1.5, f"the two-layer head's drafts were rarely accepted ({max(taus):.2f})"


def test_sampling_runs_and_stops_at_eos(family):
    name, model, head, refs = family
    gen = generator(model, head)
    ref = refs[tuple(PROMPTS[0])]
    eos = ref[5]
    gen.engine.eos_ids = {eos}
    r = gen.generate(PROMPTS[0], max_new_tokens=24, **TREES[0])
    assert r.token_ids == ref[:ref.index(eos) + 1] and r.finish_reason == "stop"
    s = gen.generate(PROMPTS[0], max_new_tokens=16, temperature=0.8, seed=1, **TREES[0])
    assert all(0 <= t < V for t in s.token_ids)


# ---- the pieces --------------------------------------------------------------------------------
@pytest.mark.parametrize("python", [False, True])
def test_lean_capture_equals_transformers_hidden_states(python):
    from eagle2.config import Backend
    from eagle2.fast import FastTarget
    from eagle2.target import Target

    model = tiny_target("llama")
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    layers = (2, 4, N_LAYERS)  # N_LAYERS: the last layer's output before the final norm
    general, lean = Target(model), FastTarget(model, backend=Backend(native=not python))
    assert not (python and lean.stack.is_native)
    feats = {}
    for name, t in (("general", general), ("lean", lean)):
        t.capture(layers)
        logits, feats[name] = t.forward(t.new_cache(64), ids, torch.arange(8), None)
        assert feats[name].shape == (8, 3 * H)
    with torch.no_grad():
        hs = model(input_ids=ids[None], output_hidden_states=True).hidden_states
    assert torch.allclose(feats["general"][:, :2 * H], torch.cat([hs[2][0], hs[4][0]], -1), atol=1e-6)
    assert torch.allclose(feats["lean"], feats["general"], atol=1e-5)
    final_norm = model.get_decoder().norm
    assert torch.allclose(final_norm(feats["general"][:, 2 * H:]), hs[N_LAYERS][0], atol=1e-5)
    general.capture(())
    assert general.forward(general.new_cache(), ids, torch.arange(8), None)[1].shape == (8, H)  # EAGLE-1/2 again


@pytest.mark.parametrize("name", FAMILIES)
def test_general_capture_equals_hidden_states_in_every_family(name):
    from eagle2.target import Target

    model = tiny_target(name)
    target = Target(model)
    target.capture((1, 4, 6))
    ids = torch.tensor(PROMPTS[2])  # longer than the sliding window
    _, feats = target.forward(target.new_cache(), ids, torch.arange(ids.shape[0]), None)
    with torch.no_grad():
        hs = model(input_ids=ids[None], output_hidden_states=True).hidden_states
    assert torch.allclose(feats, torch.cat([hs[1][0], hs[4][0], hs[6][0]], -1), atol=1e-5), name


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_lean_drafter_equals_reference_forward(native, layers):
    from eagle2.draft import make_drafter
    from eagle2.target import Target

    model = tiny_target("llama")
    cfg = replace(Eagle3Config.from_target(model.config, VD), num_layers=layers)
    head = init_eagle3_head(cfg, seed=3, draft_ids=torch.arange(2, 14))
    backend = Backend(lowbit=False, native=native)  # the head's own weights; its midlayer in C++ or in the Python loop
    drafter = make_drafter(head, Target(model), backend=backend)
    assert drafter.stack.is_native == (native and native_ext.load() is not None)
    g = torch.Generator().manual_seed(0)
    feats, toks = torch.randn(6, 3 * H, generator=g), torch.randint(0, V, (6,), generator=g)
    out = drafter.commit(feats, toks)
    with torch.no_grad():
        ref, _ = head(feats[None], model.get_input_embeddings()(toks[None]), torch.arange(6)[None])
        ref_logp = torch.log_softmax(head.logits(ref[0, -1]), -1)
    assert torch.allclose(out, ref[0, -1], atol=1e-5)
    assert torch.allclose(drafter._logp(out), ref_logp, atol=1e-5)
    assert drafter.vocab_ids.tolist() == list(range(2, 14)) and drafter.feature_width == 3 * H
    with pytest.raises(ValueError, match="own 12-token vocabulary"):
        make_drafter(head, Target(model), draft_vocab=8)


def test_d2t_maps_draft_ids_to_token_ids():
    d2t, t2d = vocab_maps(torch.tensor([8, 1, 4, 3]), 10)  # the worked example in docs/eagle3.md
    assert d2t.tolist() == [1, 2, 2, 5] and t2d.nonzero().flatten().tolist() == [1, 3, 4, 8]
    head = init_eagle3_head(Eagle3Config(H, 64, 4, 2, 8, 10, 4), draft_ids=torch.tensor([1, 3, 4, 8]))
    assert int(head.target_ids[2]) == 4 and head.target_ids.tolist() == [1, 3, 4, 8]
    with pytest.raises(ValueError, match="distinct token ids"):
        vocab_maps(torch.tensor([1, 1, 4]), 10)


def test_layer_id_conventions(tmp_path):
    assert default_layers(32) == (2, 16, 29)
    assert layers_from_config_ids([1, 15, 28]) == (2, 16, 29)  # SpecForge / SGLang: outputs of layers
    assert layers_from_config_ids([2, 16, 29]) == (2, 16, 29)  # hidden_states indices (vLLM)
    model = tiny_target("llama")
    head = init_eagle3_head(Eagle3Config.from_target(model.config, VD))
    for i, extra in enumerate(({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 6]}},
                               {"eagle_aux_hidden_state_layer_ids": [2, 4, 7]})):
        loaded = load_head(write_official(tmp_path / str(i), head, "st", extra))
        assert loaded.config.feature_layers(N_LAYERS) == (2, 4, 7)
    assert load_head(write_official(tmp_path / "plain", head)).config.feature_layers(N_LAYERS) == (2, 4, 5)


def test_wrong_d2t_or_layers_change_the_drafts(family, tmp_path):
    """The same weights with their draft ids mapped to other tokens are accepted less; read from
    other layers they draft differently. The output stays exact."""
    name, model, head, refs = family
    if name != "llama":
        pytest.skip("one family is enough")
    tree = dict(total_tokens=10, depth=4, tree_top_k=4)

    def run(h):
        gen, taus, drafts = generator(model, h), [], []
        for prompt in PROMPTS:
            r = gen.generate(prompt, max_new_tokens=24, **tree)
            assert r.token_ids == refs[tuple(prompt)]
            taus.append(r.stats.mean_accept_len)
            drafts.append(r.stats.draft_confidence)
        return sum(taus) / len(taus), drafts

    good, good_drafts = run(head)
    wrong = Eagle3Head(head.config)
    wrong.load_state_dict(head.state_dict())
    wrong.set_draft_vocab(torch.arange(V - VD, V))  # the same head, its draft ids mapped to other tokens
    assert good > run(wrong)[0] + 0.3
    shifted = write_official(tmp_path / "layers", head, config_extra={"eagle_aux_hidden_state_layer_ids": [3, 5, 6]})
    assert run(load_head(shifted))[1] != good_drafts


def first_draft(model, head, backend: str):
    """(generator, the drafter's log-probs after a prefill of PROMPTS[2], reference): ``reference(layers)`` is
    the head's own forward on transformers' ``hidden_states[i]`` for i in layers, to tell which it read."""
    gen = generator(model, head, Backend(forward=backend, lowbit=False))  # the head's own weights
    ids = torch.tensor(PROMPTS[2])
    _, feats = gen.target.forward(gen.target.new_cache(64), ids, torch.arange(ids.shape[0]), None)
    logp = gen.drafter._logp(gen.drafter.commit(feats[:-1], ids[1:]))
    with torch.no_grad():
        hidden = model(input_ids=ids[None], output_hidden_states=True).hidden_states
        emb = model.get_input_embeddings()(ids[None, 1:])
    pos = torch.arange(ids.shape[0] - 1)[None]

    @torch.no_grad()
    def reference(layers):
        out, _ = head(torch.cat([hidden[i] for i in layers], -1)[:, :-1], emb, pos)
        return torch.log_softmax(head.logits(out[0, -1]), -1)

    return gen, logp, reference


@pytest.mark.parametrize("backend", ["transformers", "fast"])
def test_head_reads_the_layers_its_config_names(tmp_path, backend):
    """A SpecForge-style config naming the outputs of layers 1, 3, 4 makes the drafter see
    transformers' hidden_states[2], [4], [5] (the default points), not [1], [3], [4]: the head's
    draft distribution after a prefill equals its reference forward on exactly those states."""
    model = tiny_target("llama")
    head = init_eagle3_head(Eagle3Config.from_target(model.config, VD), seed=4, draft_ids=torch.arange(VD))
    with torch.no_grad():
        head.fc.weight.mul_(10.0)  # make the features dominate the draft distribution
    d = write_official(tmp_path, head, "st", {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 4]}})
    _, logp, reference = first_draft(model, load_head(d), backend)
    assert torch.allclose(logp, reference((2, 4, 5)), atol=1e-4)
    assert (logp - reference((1, 3, 4))).abs().max() > 0.05


# ---- refusals ----------------------------------------------------------------------------------
def _official(tmp_path, name="h", **state_edits):
    model = tiny_target("llama")
    head = init_eagle3_head(Eagle3Config.from_target(model.config, VD), draft_ids=torch.arange(VD))
    d = write_official(tmp_path / name, head, "st")
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    for k, v in state_edits.items():
        if v is None:
            del state[k]
        else:
            state[k] = v
    save_file(state, str(d / "model.safetensors"))
    return model, d


@pytest.mark.parametrize("edit, message", [
    (dict(t2d=torch.arange(V) >= V - VD), "d2t and t2d disagree: d2t maps draft id 0 to token 0, which t2d does not keep"),
    (dict(d2t=torch.full((VD,), V - 3)), "d2t maps draft id 3 to token 16, outside the vocabulary"),
    (dict(d2t=torch.zeros(VD, dtype=torch.long).index_fill_(0, torch.tensor([1]), -1)), "two draft ids to the same token"),
    (dict(t2d=torch.ones(V, dtype=torch.bool)), "t2d keeps 16 tokens; draft_vocab_size is 12"),
    (dict(d2t=None, t2d=None), "neither d2t nor t2d"),
    (dict(**{"lm_head.weight": None}), "lack lm_head.weight"),
    (dict(**{"lm_head.weight": torch.zeros(V, H)}), r"lm_head.weight has shape \(16, 32\); config.json implies \(12, 32\)"),
    (dict(**{"midlayer.self_attn.q_proj.bias": torch.zeros(32)}), "tensors this head does not use: midlayer.self_attn.q_"),
])
def test_bad_vocab_maps_and_weights_are_refused(tmp_path, edit, message):
    _, d = _official(tmp_path, **edit)
    with pytest.raises(ValueError, match=message):
        load_head(d)


def test_t2d_alone_gives_the_mapping(tmp_path):
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[torch.arange(V - VD, V)] = True
    _, d = _official(tmp_path, d2t=None, t2d=t2d)
    assert load_head(d).target_ids.tolist() == list(range(V - VD, V))


def test_embedding_copy_is_tolerated(tmp_path):
    _, d = _official(tmp_path, **{"embed_tokens.weight": torch.zeros(V, H)})  # frozen copy of the target's
    assert "embed_tokens.weight" not in load_head(d).state_dict()


def test_head_that_does_not_fit_is_refused(tmp_path):
    small = tiny_target("llama")
    wide = make_tiny_model("llama", vocab_size=20, hidden_size=48, num_hidden_layers=N_LAYERS)
    head = init_eagle3_head(Eagle3Config.from_target(wide.config, VD))
    with pytest.raises(ValueError, match="hidden size 48 vs target 32; vocabulary 20 vs target 16"):
        generator(small, head)
    shallow = make_tiny_model("llama", vocab_size=V, num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"capture points \[2, 1, -1\] \(the default \[2, L//2, L-3\]\) outside"):
        generator(shallow, init_eagle3_head(Eagle3Config.from_target(shallow.config, VD)))
    _, d = _official(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    for extra, message in (({"num_hidden_layers": 2}, r"lack layers\.0\."),  # deeper than its weights
                           ({"num_hidden_layers": 0}, "at least one decoder layer"),
                           ({"target_hidden_size": 64}, "narrower than their target"),
                           ({"eagle_config": {"use_aux_hidden_state": False}}, "use_aux_hidden_state = false"),
                           ({"eagle_aux_hidden_state_layer_ids": [2, 4]}, "must name 3 layers")):
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
        with pytest.raises(ValueError, match=message):
            load_head(d)


# ---- export ------------------------------------------------------------------------------------
def test_save_reload_round_trip_and_serving_keys(tmp_path):
    from safetensors.torch import load_file

    model = tiny_target("qwen2")
    head = init_eagle3_head(Eagle3Config.from_target(model.config, VD), seed=5, draft_ids=torch.randperm(V)[:VD])
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # saved in bf16: make the round trip exact
    d = head.save(tmp_path / "out", n_layers=N_LAYERS)
    state = load_file(str(d / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == official_shapes(head.config)
    assert state["d2t"].dtype == torch.int64 and state["t2d"].dtype == torch.bool
    cfg = json.loads((d / "config.json").read_text())
    assert set(cfg) - {"target_model_type"} == SERVING_CONFIG
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == VD
    assert cfg["bias"] is False and cfg["attention_bias"] is False and cfg["tie_word_embeddings"] is False
    assert cfg["eagle_config"] == {"use_aux_hidden_state": True}  # default capture points stay implicit
    assert is_eagle3(d)
    loaded = load_head(d)
    assert loaded.state_dict().keys() == head.state_dict().keys()
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    a = generator(model, head).generate(PROMPTS[0], max_new_tokens=16, **TREES[0])
    b = generator(model, loaded).generate(PROMPTS[0], max_new_tokens=16, **TREES[0])
    assert a.token_ids == b.token_ids and a.stats.accept_lengths == b.stats.accept_lengths


def test_export_of_other_capture_points(tmp_path):
    model = tiny_target("llama")
    cfg = Eagle3Config.from_target(model.config, VD, layers=(3, 4, 7))
    d = init_eagle3_head(cfg).save(tmp_path / "a", n_layers=N_LAYERS)
    written = json.loads((d / "config.json").read_text())["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    assert written == [3, 4, 7] and load_head(d).config.feature_layers(N_LAYERS) == (3, 4, 7)
    with pytest.raises(ValueError, match="cannot be exported"):
        init_eagle3_head(Eagle3Config.from_target(model.config, VD, layers=(1, 4, 7))).save(tmp_path / "b", N_LAYERS)


def test_eagle2_load_runs_an_official_eagle3_head(tmp_path, smol_dir, smol_tokenizer):
    """The public path: eagle2.load(model dir, head=official EAGLE-3 dir) with a chat prompt."""
    import shutil

    import eagle2

    model = make_tiny_model("llama", vocab_size=len(smol_tokenizer), num_hidden_layers=N_LAYERS,
                            max_position_embeddings=512)
    model.save_pretrained(tmp_path / "model")
    for f in smol_dir.iterdir():
        if "token" in f.name or f.name.endswith((".jinja", ".txt")):
            shutil.copy(f, tmp_path / "model" / f.name)
    head = init_eagle3_head(Eagle3Config.from_target(model.config, 64), draft_ids=torch.arange(64) * 7)
    write_official(tmp_path / "head", head, "bin")
    gen = eagle2.load(str(tmp_path / "model"), head=str(tmp_path / "head"), dtype="float32")
    assert isinstance(gen.head, Eagle3Head) and gen.target.feature_layers == (2, 4, 5)
    prompt = gen.encode_prompt("Why is the sky blue?")
    r = gen.generate(prompt, max_new_tokens=8, total_tokens=8, depth=3, tree_top_k=4)
    assert r.token_ids == hf_greedy(gen.model, prompt, 8)
