"""kernels.py: prepacked linears are bit-identical to F.linear, or not used at all."""

import pytest
import torch
import torch.nn.functional as F

from eagle2 import kernels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_equals_f_linear_bit_for_bit(dtype, with_bias):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(200, 72, generator=g) * 0.05).to(dtype)
    b = torch.randn(200, generator=g).to(dtype) if with_bias else None
    fn = kernels.linear(w, b)
    for shape in ((1, 72), (16, 72), (3, 9, 72)):
        x = torch.randn(*shape, generator=g).to(dtype)
        assert torch.equal(fn(x), F.linear(x, w, b)), shape


def test_fp32_is_never_packed():
    # fp32 is the dtype of the token-for-token checks: it must run transformers' own kernel.
    assert not kernels.packing_works(torch.float32)
    w = torch.randn(8, 4)
    fn = kernels.linear(w)
    assert not fn.packed and fn.weight.data_ptr() == w.data_ptr()


def test_disabled_falls_back(monkeypatch):
    monkeypatch.setattr(kernels, "ENABLED", False)
    fn = kernels.linear(torch.randn(8, 4, dtype=torch.bfloat16))
    assert not fn.packed


def test_fast_target_packed_logits_equal_unpacked(monkeypatch):
    """The lean forward gives the same bf16 logits with and without packing."""
    from conftest import make_tiny_model
    from eagle2.fast import FastTarget

    model = make_tiny_model("llama", vocab_size=64).to(torch.bfloat16)
    tokens = torch.randint(0, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(3))
    outs = []
    for enabled in (False, True):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        tgt = FastTarget(model)
        cache = tgt.new_cache(capacity=32)
        outs.append(tgt.forward(cache, tokens, torch.arange(12), None)[0])
    assert torch.equal(outs[0], outs[1])
