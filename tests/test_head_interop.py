"""Heads as other trainers ship them: tensors a head's math would need but this loader does not run
are refused (never dropped, which would draft with a different model), and an EAGLE-3 head is told
apart from an EAGLE-1/2 one by its weights in either file format."""

import json

import pytest
import torch

from eagle2.api import load_head
from eagle2.draft_head import DraftHead, HeadConfig, init_head
from eagle2.eagle3_head import Eagle3Config, Eagle3Head, init_eagle3_head, is_eagle3

from conftest import make_tiny_model
from test_eagle3 import N_LAYERS, V, tiny_target, write_official

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


@pytest.mark.parametrize("field", ["rope_scaling", "rope_parameters"])  # transformers 4.x / 5.x names
def test_eagle3_rope_scaling_is_reported_under_either_name(tmp_path, field, caplog):
    model = tiny_target("llama")
    head = init_eagle3_head(Eagle3Config.from_target(model.config, V))
    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    d = write_official(tmp_path, head, "st", {field: scaling})
    with caplog.at_level("WARNING", logger="eagle2"):
        load_head(d)
    assert "runs plain RoPE" in caplog.text


def test_speculators_format_is_named_in_the_refusal(tmp_path):
    """vLLM's speculators checkpoints nest the layer config; the refusal says so, not which field is missing."""
    model = tiny_target("llama")
    d = write_official(tmp_path, init_eagle3_head(Eagle3Config.from_target(model.config, V)), "st")
    layer = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
                                               "transformer_layer_config": layer, "draft_vocab_size": V}))
    with pytest.raises(ValueError, match="speculators format"):
        load_head(d)
