"""Heads as other trainers ship them: tensors a head's math would need but this loader does not run
are refused (never dropped, which would draft with a different model), and an EAGLE-3 head is told
apart from an EAGLE-1/2 one by its weights in either file format. EAGLE-3 heads in vLLM's
speculators format (nested ``transformer_layer_config``, ``layers.0.*`` weights; written here as
vllm-project/speculators saves them) draft exactly as the same weights in the official layout,
keep the fp32 contract on both target backends, read the layers their config names as vLLM does,
and are refused in one line where they need what this loader does not run."""

import json
import re
from dataclasses import replace

import pytest
import torch

from eagle2.api import load_head
from eagle2.draft_head import DraftHead, HeadConfig, init_head
from eagle2.eagle3_head import Eagle3Config, Eagle3Head, init_eagle3_head, is_eagle3

from conftest import make_tiny_model
from test_eagle3 import N_LAYERS, V, VD, first_draft, fit_eagle3, generator, tiny_target, write_official
from test_engine import PROMPTS, TREES, hf_greedy

H = 32


def _eagle1_dir(tmp_path, extra: dict) -> "Path":
    """An EAGLE-1/2 head saved in the released layout, its weights plus ``extra`` tensors."""
    from safetensors.torch import load_file, save_file

    model = make_tiny_model("llama", vocab_size=16)
    d = init_head(HeadConfig.from_target(model.config, bias=False)).save(tmp_path / "head")
    state = load_file(str(d / "model.safetensors"))
    save_file({**state, **extra}, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("key", ["layers.0.input_layernorm.weight",  # a layer with an input norm
                                 "embedding_layernorm.weight",  # HASS (add_para_norm)
                                 "norm.weight", "layers.0.self_attn.o_proj.bias"])
def test_eagle1_tensors_the_head_does_not_run_are_refused(tmp_path, key):
    d = _eagle1_dir(tmp_path, {key: torch.full((H,), 2.0)})
    with pytest.raises(ValueError, match=f"tensors this head does not use: {key}"):
        DraftHead.load(d)


def test_eagle1_copies_and_derived_buffers_are_tolerated(tmp_path):
    d = _eagle1_dir(tmp_path, {"embed_tokens.weight": torch.zeros(16, H), "lm_head.weight": torch.zeros(16, H),
                               "layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    assert isinstance(DraftHead.load(d), DraftHead)


def test_eagle3_bin_without_draft_vocab_size_is_recognised(tmp_path):
    """A full-vocabulary EAGLE-3 head (config without draft_vocab_size, architecture LlamaForCausalLM)
    is an EAGLE-3 head by its midlayer weights, in pytorch_model.bin as in model.safetensors."""
    model = tiny_target("llama")
    head = init_eagle3_head(Eagle3Config.from_target(model.config, V))
    for fmt in ("bin", "st"):
        d = write_official(tmp_path / fmt, head, fmt)
        cfg = json.loads((d / "config.json").read_text())
        del cfg["draft_vocab_size"]
        (d / "config.json").write_text(json.dumps(cfg))
        assert is_eagle3(d), fmt
        loaded = load_head(d)
        assert isinstance(loaded, Eagle3Head) and loaded.config.draft_vocab_size == V
        assert loaded.config.feature_layers(N_LAYERS) == (2, 4, 5)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # the tiny heads' wavelengths (6 to 10^5) lie on both sides of 64 / 4 and 64
SCALINGS = {"llama3": LLAMA3, "linear": {"rope_type": "linear", "factor": 4.0},
            "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},  # cos, sin scaled too
            "dynamic": {"type": "dynamic", "factor": 2.0}}  # 4.x's name for the type


def transformers_rope(scaling: dict, theta: float, head_dim: int, positions: torch.Tensor):
    """cos, sin [1, T, D] of transformers' own Llama rotary embedding under this scaling."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=128,
                      rope_parameters={"rope_type": scaling.get("rope_type", scaling.get("type")), "rope_theta": theta,
                                       **{k: v for k, v in scaling.items() if k not in ("type", "rope_type")}})
    return LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), positions[None])


@pytest.mark.parametrize("kind", list(SCALINGS))
@pytest.mark.parametrize("field", ["rope_scaling", "rope_parameters"])  # transformers 4.x / 5.x names
def test_eagle3_head_rotates_as_transformers_under_its_rope_scaling(tmp_path, kind, field):
    """A head whose config.json carries rope scaling (SpecForge / speculators heads for Llama 3.1: llama3)
    gets the rotation transformers gives that config, cos and sin alike; plain RoPE would differ."""
    scaling, theta = SCALINGS[kind], 500000.0
    model = tiny_target("llama")
    head = init_eagle3_head(Eagle3Config.from_target(model.config, V))
    # each name as its transformers writes it: 4.x the base beside the scaling, 5.x inside the parameters
    rope = {field: scaling, "rope_theta": theta} if field == "rope_scaling" else {field: {**scaling, "rope_theta": theta}}
    d = write_official(tmp_path, head, "st", {**rope, "max_position_embeddings": 128})
    loaded = load_head(d)
    pos = torch.arange(0, 120, dtype=torch.long)
    cos, sin = loaded.rope(pos[None], torch.float32)  # [1, 1, T, D]
    ref_cos, ref_sin = transformers_rope(scaling, theta, loaded.config.head_dim, pos)
    torch.testing.assert_close(cos[0, 0], ref_cos[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[0, 0], ref_sin[0], rtol=1e-6, atol=1e-6)
    if kind != "dynamic":  # (dynamic NTK equals plain RoPE up to max_position_embeddings)
        plain = replace(loaded.config, rope_scaling=None)
        assert not torch.allclose(Eagle3Head(plain).rope(pos[None], torch.float32)[0], cos)
    again = Eagle3Config.from_json(loaded.config.to_json(N_LAYERS))
    assert again == loaded.config and again.rope_scaling["rope_type"] == kind  # exported as SGLang / vLLM read it


def test_eagle1_head_takes_its_targets_rope_scaling_and_keeps_it(tmp_path):
    """An EAGLE-1/2 head built for a target with llama3 scaling rotates as that target's layers, and the
    scaling survives save and load."""
    model = make_tiny_model("llama", vocab_size=16, rope_parameters={**LLAMA3, "rope_theta": 500000.0},
                            max_position_embeddings=128)
    cfg = HeadConfig.from_target(model.config, bias=False)
    assert cfg.rope_scaling == LLAMA3 and cfg.rope_theta == 500000.0
    loaded = DraftHead.load(init_head(cfg).save(tmp_path / "head"))
    assert loaded.config == cfg
    pos = torch.arange(0, 120)
    cos, _ = loaded.rope(pos[None], torch.float32)
    ref_cos, _ = model.model.rotary_emb(torch.zeros(1), pos[None])
    torch.testing.assert_close(cos[0, 0], ref_cos[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scaling, match", [({"rope_type": "wobbly", "factor": 2.0}, "RoPE type 'wobbly' is unknown"),
                                            ({"rope_type": "linear"}, "missing or has a bad field"),
                                            ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
                                             "partial_rotary_factor")])
def test_a_head_rope_it_cannot_run_is_refused_in_one_line(tmp_path, scaling, match):
    model = tiny_target("llama")
    head = init_eagle3_head(Eagle3Config.from_target(model.config, V))
    with pytest.raises(ValueError, match=match):
        load_head(write_official(tmp_path, head, "st", {"rope_scaling": scaling}))


def test_a_length_dependent_rope_is_reported(tmp_path, caplog):
    model = tiny_target("llama")
    head = init_eagle3_head(Eagle3Config.from_target(model.config, V))
    d = write_official(tmp_path, head, "st", {"rope_scaling": SCALINGS["dynamic"]})
    with caplog.at_level("WARNING", logger="eagle2"):
        load_head(d)
    assert "changes with the sequence's length" in caplog.text


def write_speculators(directory, head: Eagle3Head, embed: torch.Tensor | None = None, layer_ids=None,
                      **top) -> "Path":
    """A head as vllm-project/speculators saves it: config.json with the decoder layer's Llama config
    under transformer_layer_config, draft_vocab_size / norm_before_residual / layer ids at the top,
    a speculators_config (verifier, proposal methods); weights ``layers.0.*`` for the midlayer
    (``layers.{i+1}.*`` for our ``layers.i.*``), fc, norm, lm_head, d2t, t2d and the frozen
    ``embed_tokens`` copy of the verifier's. ``top`` overrides top-level fields (None drops one)."""
    from safetensors.torch import save_file

    cfg = head.config
    layer = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.hidden_size,
             "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
             "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
             "num_hidden_layers": cfg.num_layers, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps,
             "rope_theta": cfg.rope_theta, "hidden_act": cfg.hidden_act, "max_position_embeddings": 2048,
             "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}
    config = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "speculators_version": "0.3.0",
              "draft_vocab_size": cfg.draft_vocab_size, "norm_before_residual": cfg.norm_before_residual,
              "target_hidden_size": None, "transformer_layer_config": layer, "torch_dtype": "float32",
              "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                     "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3,
                                                           "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                                     "verifier": {"name_or_path": "tiny/llama", "architectures": ["LlamaForCausalLM"]}}}
    if layer_ids is not None:
        config["eagle_aux_hidden_state_layer_ids"] = list(layer_ids)
    config.update(top)
    config = {k: v for k, v in config.items() if v is not None or k == "target_hidden_size"}

    def speculators_name(k: str) -> str:
        m = re.match(r"layers\.(\d+)\.", k)
        if m:
            return f"layers.{int(m[1]) + 1}." + k[m.end():]
        return "layers.0." + k.removeprefix("midlayer.") if k.startswith("midlayer.") else k

    state = {speculators_name(k): v.detach().clone().contiguous() for k, v in head.state_dict().items()}
    if embed is not None:
        state["embed_tokens.weight"] = embed.detach().clone().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def fitted():
    """A tiny target and heads fitted to it (one and two decoder layers): drafts that get accepted."""
    model = tiny_target("llama")
    refs = {tuple(p): hf_greedy(model, p, 24) for p in PROMPTS}  # transformers' greedy, 24 new tokens
    return model, {layers: fit_eagle3(model, layers=layers) for layers in (1, 2)}, refs


@pytest.mark.parametrize("backend", ["transformers", "fast"])
@pytest.mark.parametrize("layers, norm_before_residual", [(1, False), (1, True), (2, False)])
def test_speculators_head_drafts_as_the_official_layout(fitted, tmp_path, backend, layers, norm_before_residual):
    """The same weights in both layouts (the official one as ``Eagle3Head.save`` writes it) load to the
    same head and give the same rounds (accept lengths, draft probabilities) and transformers' own
    greedy output (the fp32 contract)."""
    model, heads, refs = fitted
    head = Eagle3Head(replace(heads[layers].config, norm_before_residual=norm_before_residual))
    head.load_state_dict({k: v if k in ("d2t", "t2d") else v.to(torch.bfloat16).float()  # as save() stores them
                          for k, v in heads[layers].state_dict().items()})
    official = load_head(head.save(tmp_path / "official", n_layers=N_LAYERS))
    d = write_speculators(tmp_path / "speculators", head, embed=model.get_input_embeddings().weight)
    assert is_eagle3(d)
    spec = load_head(d)
    assert isinstance(spec, Eagle3Head) and spec.config == replace(official.config, target_model_type=None)  # ours
    assert spec.config.num_layers == layers and spec.config.norm_before_residual == norm_before_residual
    assert spec.state_dict().keys() == official.state_dict().keys()
    for k, v in official.state_dict().items():
        assert torch.equal(spec.state_dict()[k], v), k
    a, b = generator(model, official, backend), generator(model, spec, backend)
    taus = []
    for prompt in PROMPTS:
        ra, rb = a.generate(prompt, max_new_tokens=24, **TREES[0]), b.generate(prompt, max_new_tokens=24, **TREES[0])
        assert rb.token_ids == ra.token_ids == refs[tuple(prompt)], f"{backend} prompt={prompt}"
        assert rb.stats.accept_lengths == ra.stats.accept_lengths
        assert rb.stats.draft_confidence == ra.stats.draft_confidence
        taus.append(rb.stats.mean_accept_len)
    if not norm_before_residual:  # the head was fitted without it
        assert max(taus) > 1.5, f"the speculators head's drafts were rarely accepted ({max(taus):.2f})"


def test_speculators_config_reading():
    """vLLM's reading of the fields: norm_before_residual is True when absent; draft vocabulary,
    capture points and target_hidden_size come from the top level; the decoder layer from the nested config."""
    layer = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": V, "rope_theta": 500000.0, "num_hidden_layers": 1}
    cfg = Eagle3Config.from_json({"speculators_model_type": "eagle3", "transformer_layer_config": layer,
                                  "draft_vocab_size": VD, "target_hidden_size": None})
    assert cfg.norm_before_residual and cfg.layers is None and cfg.draft_vocab_size == VD
    assert (cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta) == (32, 8, 2, 500000.0)
    cfg = Eagle3Config.from_json({"speculators_model_type": "eagle3", "transformer_layer_config": layer,
                                  "norm_before_residual": False, "eagle_aux_hidden_state_layer_ids": [1, 15, 28]})
    assert not cfg.norm_before_residual and cfg.draft_vocab_size == V
    assert cfg.layers == (1, 15, 28)  # as vLLM reads them: hidden_states indices, no + 1 as for SpecForge's ids


@pytest.mark.parametrize("backend", ["transformers", "fast"])
def test_speculators_layer_ids_are_honoured(tmp_path, backend):
    """eagle_aux_hidden_state_layer_ids [1, 3, 4] in a speculators config make the drafter see
    transformers' hidden_states[1], [3], [4] (vLLM captures the input of layer i), not [2, 4, 5]
    (what the same ids in an official config mean, SGLang's reading) nor the default."""
    model = tiny_target("llama")
    head = init_eagle3_head(Eagle3Config.from_target(model.config, VD), seed=4, draft_ids=torch.arange(VD))
    with torch.no_grad():
        head.fc.weight.mul_(10.0)  # make the features dominate the draft distribution
    gen, logp, reference = first_draft(model, load_head(write_speculators(tmp_path, head, layer_ids=[1, 3, 4])),
                                       backend)
    assert gen.target.feature_layers == (1, 3, 4)
    assert torch.allclose(logp, reference((1, 3, 4)), atol=1e-4)
    assert (logp - reference((2, 4, 5))).abs().max() > 0.05


def _refusal(tmp_path, layer_edit=None, **top) -> str:
    model = tiny_target("llama")
    head = init_eagle3_head(Eagle3Config.from_target(model.config, VD), draft_ids=torch.arange(VD))
    d = write_speculators(tmp_path, head, **top)
    if layer_edit:
        cfg = json.loads((d / "config.json").read_text())
        cfg["transformer_layer_config"].update(layer_edit)
        (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_head(d)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("top, layer_edit, message", [
    (dict(norm_before_fc=True), None, "norm_before_fc"),
    (dict(embed_requires_grad=True), None, "embed_requires_grad"),
    (dict(speculators_model_type="peagle"), None, "speculators head of type 'peagle'"),
    (dict(speculators_model_type="eagle", architectures=["EagleSpeculator"], draft_vocab_size=None), None,
     "speculators head of type 'eagle'"),  # an EAGLE-1 speculator: not read as an EAGLE-1/2 head either
    (dict(target_hidden_size=64), None, "narrower than their target"),
    (dict(layer_ids=[2, 4]), None, "must name 3 layers"),
    (dict(transformer_layer_config="llama"), None, "lacks a transformer_layer_config"),
    ({}, dict(model_type="qwen3"), "'qwen3' decoder layer"),
    ({}, dict(attention_bias=True), "transformer_layer_config.attention_bias"),
    ({}, dict(hidden_size=None), "missing or has a bad field"),
])
def test_speculators_heads_this_loader_cannot_run_are_refused(tmp_path, top, layer_edit, message):
    assert message in _refusal(tmp_path, layer_edit, **top)
