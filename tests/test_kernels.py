"""kernels.py: prepacked linears are bit-identical to F.linear in bf16 and equal to fp32 rounding in fp32,
or not used at all."""

import pytest
import torch
import torch.nn.functional as F

from eagle2 import kernels
from eagle2.config import Backend


@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_linear_equals_f_linear_bit_for_bit(with_bias):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(200, 72, generator=g) * 0.05).to(torch.bfloat16)
    b = torch.randn(200, generator=g).to(torch.bfloat16) if with_bias else None
    fn = kernels.linear(w, b)
    for shape in ((1, 72), (16, 72), (3, 9, 72)):
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        assert torch.equal(fn(x), F.linear(x, w, b)), shape


@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_linear_equals_f_linear_to_rounding(with_bias):
    """fp32 may be packed (another summation order): products agree with F.linear to fp32 rounding."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(576, 1536, generator=g) * 0.05
    b = torch.randn(576, generator=g) if with_bias else None
    fn = kernels.linear(w, b)
    assert fn.packed == kernels.packing_works(torch.float32)
    for shape in ((1, 1536), (4, 1536), (16, 1536), (3, 9, 1536)):
        x = torch.randn(*shape, generator=g)
        ref = F.linear(x, w, b)
        got = fn(x)
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert not torch.equal(got, ref + 1e-2)  # a check that can fail


def test_fp32_packing_off_runs_transformers_kernel():
    """Packing off (EAGLE2_PACKED_LINEAR=0) gives the reference arithmetic: the plain weight and F.linear."""
    w = torch.randn(8, 4)
    fn = kernels.linear(w, pack=False)
    assert not fn.packed and fn.weight.data_ptr() == w.data_ptr()
    x = torch.randn(3, 4)
    assert torch.equal(fn(x), F.linear(x, w))


def test_disabled_falls_back():
    fn = kernels.linear(torch.randn(8, 4, dtype=torch.bfloat16), pack=False)
    assert not fn.packed


def test_fast_target_packed_logits_equal_unpacked():
    """The lean forward gives the same bf16 logits with and without packing."""
    from conftest import make_tiny_model
    from eagle2.fast import FastTarget

    model = make_tiny_model("llama", vocab_size=64).to(torch.bfloat16)
    tokens = torch.randint(0, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(3))
    outs = []
    for enabled in (False, True):
        tgt = FastTarget(model, backend=Backend(packed_linear=enabled))
        assert tgt.stack.packed == (enabled and kernels.packing_works(torch.bfloat16))
        cache = tgt.new_cache(capacity=32)
        outs.append(tgt.forward(cache, tokens, torch.arange(12), None)[0])
    assert torch.equal(outs[0], outs[1])


# -- low-bit block weights ----------------------------------------------------------------------

def _q4_blocks(n: int, k: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """fp32 [n, k] weights made as a Q4_1 GGUF dequantizes: d * q + m per block of 32, fp16 d, m."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # each block spans the full code range, as the quantizer makes it
    d = ((torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-4) * scale).half().float()
    m = (-torch.rand(n, k // 32, 1, generator=g) * 0.08 * scale).half().float()
    return (d * q + m).reshape(n, k)


def as_gguf_blocks(model) -> None:
    """Set a model's projection weights (not the embedding) to exact GGUF-style blocks, in place:
    Q8_0 for the lm_head, Q4_1 elsewhere, scaled like the weights they replace."""
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.dim() == 2 and "embed" not in name:
                make = _q8_blocks if "lm_head" in name else _q4_blocks
                p.copy_(make(*p.shape, seed=i, scale=p.abs().max().item() / (0.127 if "lm_head" in name else 0.08)))


def _q8_blocks(n: int, k: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """fp32 [n, k] weights made as a Q8_0 GGUF dequantizes: d * q per block of 32, fp16 d, |q| <= 127."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k // 32, 32), generator=g).float()
    q[..., 0] = 127  # the block's largest magnitude maps to 127, as the quantizer makes it
    d = ((torch.rand(n, k // 32, 1, generator=g) * 0.001 + 1e-5) * scale).half().float()
    return (d * q).reshape(n, k)


BLOCKS = {"q4": (_q4_blocks, kernels.Q4_RECORD), "q8": (_q8_blocks, kernels.Q8_RECORD)}


def test_find_blocks_rebuild_the_bf16_weight_or_refuse():
    src = _q4_blocks(48, 96)
    w = src.to(torch.bfloat16)
    q, d, m = kernels.find_q4(w, src)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    rebuilt = (d[..., None] * q.view(48, 3, 32).float() + m[..., None]).reshape(48, 96).to(torch.bfloat16)
    assert torch.equal(rebuilt, w)
    src8 = _q8_blocks(48, 96)
    q8, d8 = kernels.find_q8(src8.to(torch.bfloat16), src8)
    assert torch.equal((d8[..., None] * q8.view(48, 3, 32).float()).reshape(48, 96).to(torch.bfloat16),
                       src8.to(torch.bfloat16))
    for good in (src, src8):
        noisy = good.clone()
        noisy[5, 7] += 1e-3  # one weight off the grid: not a block format any more
        assert kernels.find_q4(noisy.to(torch.bfloat16), noisy) is None
        assert kernels.find_q8(noisy.to(torch.bfloat16), noisy) is None
    assert kernels.find_q4(torch.randn(48, 96).to(torch.bfloat16), torch.randn(48, 96)) is None


needs_lowbit = pytest.mark.skipif(not kernels.lowbit_usable(torch.zeros(16, 32, dtype=torch.bfloat16)),
                                  reason="the block-weight kernel needs AVX512-BF16 and the native extension")


@needs_lowbit
@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lowbit_linear_matches_the_bf16_linear(fmt, with_bias):
    """Same bf16 weights, fp32 accumulation on the tile unit: the products equal oneDNN's bf16
    kernel here; a different summation order may change the last bit of a few outputs, never more."""
    make, record = BLOCKS[fmt]
    n, k = 80, 192
    src = make(n, k, seed=1)
    w = src.to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if with_bias else None
    fn = kernels.linear(w, b, source=src)
    assert fn.lowbit is not None and fn.lowbit.shape == (n // 16, k // 32, record)
    for shape in ((1, k), (5, k), (16, k), (17, k), (32, k), (2, 16, k), (33, k), (70, k)):  # > 32 rows: bf16 path
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        got, ref = fn(x), F.linear(x, w, b)
        assert got.shape == ref.shape
        exact = x.float() @ w.float().T + (0 if b is None else b.float())
        ulp = (ref.float().abs() * 2.0 ** -7).clamp_min(1e-30)
        assert ((got.float() - ref.float()).abs() <= ulp).all(), shape  # at most one bf16 step apart
        assert (got != ref).float().mean() < 0.01, shape
        assert (got.float() - exact).abs().max() <= (ref.float() - exact).abs().max() * 1.5 + 1e-3


@needs_lowbit
@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_lowbit_rows_are_bit_identical_to_the_row_alone(fmt):
    """Row invariance: a row computed inside a call of 2..64 rows equals, bit for bit, that row in a call
    of its own (a decode step), for every chunking of rows the kernel takes."""
    make, _ = BLOCKS[fmt]
    n, k = 48, 256
    src = make(n, k, seed=5)
    w = src.to(torch.bfloat16)
    b = torch.randn(n, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    fn = kernels.linear(w, b, source=src)
    assert fn.lowbit is not None
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    alone = torch.cat([fn(x[i:i + 1]) for i in range(64)])
    for rows in (2, 3, 5, 6, 7, 12, 13, 16, 31, 32, 33, 64):
        got = fn(x[:rows], exact=True)
        assert torch.equal(got, alone[:rows]), rows
    assert not torch.equal(alone[:1], fn(x[1:2]))  # the rows differ: the comparison can fail


@needs_lowbit
def test_lowbit_only_with_an_exact_source():
    w = torch.randn(32, 64).to(torch.bfloat16)
    assert kernels.linear(w, None, source=w.float()).lowbit is None  # not block weights
    assert kernels.linear(w).lowbit is None  # no source
    src = _q4_blocks(32, 64)
    assert kernels.linear(src.to(torch.bfloat16), None, source=src).lowbit.shape[-1] == kernels.Q4_RECORD
    src8 = _q8_blocks(32, 64)
    assert kernels.linear(src8.to(torch.bfloat16), None, source=src8).lowbit.shape[-1] == kernels.Q8_RECORD
    if not kernels.lowbit_runs(torch.float32, torch.device("cpu")):
        assert kernels.linear(src, None, source=src).lowbit is None  # no fp32 kernel on this CPU


needs_lowbit_f32 = pytest.mark.skipif(not kernels.lowbit_runs(torch.float32, torch.device("cpu")),
                                      reason="the fp32 block-weight kernel needs AVX2 + FMA and the native extension")


@needs_lowbit_f32
@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("k", [192, 576])
def test_lowbit_fp32_matches_f_linear_and_is_row_invariant(fmt, k):
    """fp32 activations on the blocks (AVX2): the rebuilt weights are the fp32 weights themselves, so the
    product equals F.linear's up to fp32 rounding (the kernel factors d and m out of each block; stated:
    1e-5 of the outputs' scale), and every row equals, bit for bit, that row computed alone. 2-7 rows take
    the register paths (one or two passes), 8 and more the converted chunks of 8 blocks (k = 576, 18 blocks,
    crosses them) in groupings of three and two rows."""
    make, record = BLOCKS[fmt]
    n = 80
    src = make(n, k, seed=3)
    b = torch.randn(n, generator=torch.Generator().manual_seed(4))
    fn = kernels.linear(src, b, source=src)
    assert fn.lowbit is not None and fn.lowbit.shape == (n // 16, k // 32, record)
    assert kernels.linear(src + 1e-3, b, source=src + 1e-3).lowbit is None  # off the block grid: plain weights
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(5))
    got, ref = fn(x), F.linear(x, src, b)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().mean()
    alone = torch.cat([fn(x[i:i + 1]) for i in range(40)])
    for rows in (2, 3, 4, 5, 6, 7, 8, 9, 17, 32):
        assert torch.equal(fn(x[:rows]), alone[:rows]), rows


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=needs_lowbit),
    pytest.param(torch.float32, marks=needs_lowbit_f32)])
def test_fast_target_with_block_weights_gives_the_same_logits(tmp_path, dtype):
    """A model stored in fp32 with 4-bit layers and an 8-bit lm_head (a dequantized GGUF), loaded
    in bf16 or fp32: the lean forward's logits with the block kernel equal those without it."""
    from conftest import make_tiny_model
    from transformers import AutoModelForCausalLM
    from eagle2.fast import FastTarget

    model = make_tiny_model("llama", vocab_size=64, hidden_size=64, intermediate_size=128, head_dim=16)
    as_gguf_blocks(model)
    model.save_pretrained(tmp_path)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    tokens = torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(3))
    outs = []
    for enabled in (False, True):
        tgt = FastTarget(bf16, backend=Backend(lowbit=enabled))
        assert all((L.qkv.lowbit is not None) == enabled for L in tgt.stack.layers)
        assert (tgt._lm.lowbit is not None) == enabled
        assert (tgt.float_weight(bf16.lm_head.weight) is not None) == enabled  # rows for the drafter's FR-Spec lm_head
        cache = tgt.new_cache(capacity=64)
        first = tgt.forward(cache, tokens[:12], torch.arange(12), None)[0]  # 12 rows: the block kernel
        tree = tgt.forward(cache, tokens[12:], torch.arange(12, 20), None)[0]
        outs.append(torch.cat([first, tree]))
    # The two kernels may round a hidden value one bf16 step apart (another summation order); through a
    # random tiny model such a step moves a logit by up to a few percent of the logits' scale, never more.
    assert (outs[0] - outs[1]).abs().max() <= outs[0].abs().mean() * 2.0 ** -4
    assert torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_to_q8_gives_blocks_find_q8_recovers(dtype):
    """A weight rounded by ``round_to_q8`` is Q8_0 blocks bit for bit in either dtype, within half a
    step of the original."""
    from eagle2.kernels import find_q8, round_to_q8

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(32, 96, generator=g) * 0.05).to(dtype)
    w[3, :32] = 0  # an all-zero block
    v = round_to_q8(w)
    found = find_q8(v.to(dtype), v)
    assert found is not None
    q, d = found
    assert torch.equal((d.repeat_interleave(32, 1) * q.float()).to(dtype), v.to(dtype))
    step = d.repeat_interleave(32, 1)
    assert bool(((v - w.float()).abs() <= step / 2 + 1e-12).all())
