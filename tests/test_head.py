"""Draft head: save/load round trip in the released EAGLE layout (fc bias on and off), the
vLLM-style `model.` prefix and pytorch_model.bin, and refusal of heads that do not fit."""

import json

import pytest
import torch

from eagle2.draft_head import DraftHead, HeadConfig, init_head

from conftest import make_generator, make_tiny_model


@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_released_layout(tmp_path, bias):
    model = make_tiny_model("qwen2", vocab_size=16)
    head = init_head(HeadConfig.from_target(model.config, bias=bias), seed=1)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # saved in bf16: make the round trip exact
    head.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["bias"] is bias and cfg["num_hidden_layers"] == 1 and cfg["architectures"] == ["LlamaForCausalLM"]
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert ("fc.bias" in keys) is bias
    assert {"fc.weight", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.bias",
            "layers.0.mlp.down_proj.weight", "layers.0.post_attention_layernorm.weight"} <= keys
    loaded = DraftHead.load(tmp_path)
    for (k, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    prompt = [1, 2, 3, 4]
    a = make_generator(model, head=head).generate(prompt, max_new_tokens=12)
    b = make_generator(model, head=loaded).generate(prompt, max_new_tokens=12)
    assert a.token_ids == b.token_ids and a.stats.accept_lengths == b.stats.accept_lengths


def test_vllm_prefix_and_pytorch_bin(tmp_path):
    model = make_tiny_model("llama", vocab_size=16)
    head = init_head(HeadConfig.from_target(model.config, bias=False), seed=2)
    head.save(tmp_path)
    state = {f"model.{k}": v for k, v in head.state_dict().items()}
    state["model.embed_tokens.weight"] = torch.zeros(16, 32)  # released heads may carry a copy
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = DraftHead.load(tmp_path)
    assert torch.equal(loaded.fc.weight, head.fc.weight)


def test_mismatched_head_is_refused(tmp_path):
    small = make_tiny_model("llama", vocab_size=16)
    other = make_tiny_model("llama", vocab_size=20, hidden_size=48, num_attention_heads=4)
    head = init_head(HeadConfig.from_target(other.config))
    with pytest.raises(ValueError, match="hidden size 48 vs target 32.*vocabulary 20 vs target 16"):
        make_generator(small, head=head)


def test_missing_and_corrupt_head_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        DraftHead.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        DraftHead.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DraftHead.load(tmp_path)
    model = make_tiny_model("llama", vocab_size=16)
    init_head(HeadConfig.from_target(model.config)).save(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="could not read head weights"):
        DraftHead.load(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither model.safetensors nor pytorch_model.bin"):
        DraftHead.load(tmp_path)


def test_head_for_another_architecture_is_refused():
    llama = make_tiny_model("llama", vocab_size=16)
    qwen = make_tiny_model("qwen2", vocab_size=16)
    head = init_head(HeadConfig.from_target(qwen.config))
    with pytest.raises(ValueError, match="built for qwen2, target is llama"):
        make_generator(llama, head=head)


def test_weights_decide_the_biases(tmp_path):
    # An exported config that omits "bias" (= True by the released convention) but has no fc.bias
    model = make_tiny_model("llama", vocab_size=16)
    head = init_head(HeadConfig.from_target(model.config, bias=False))
    head.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["bias"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = DraftHead.load(tmp_path)
    assert loaded.config.bias is False and loaded.fc.bias is None
