// The lean forward's decoder stack in C++: the same ATen calls as fast.py's Python loop, minus
// the Python interpreter between them.
//
// A small model's forward on a CPU is ~2000 tiny tensor ops; in Python each costs a few
// microseconds of interpreter and binding overhead on top of its kernel. This file runs the same
// ops from C++, except two fused loops (RoPE + cache writes, the elementwise tail of RMSNorm)
// that round every intermediate exactly as ATen's elementwise ops do (compute in float, round
// to nearest even), so the output is bit-identical to fast.py's Python loop (a test checks it).
// It knows nothing of models: Python hands it the weights, the caches and the rotary rows.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// float <-> element type, rounding as ATen does; written on raw bits so the compiler vectorizes
// the loops that use them (c10's scalar conversions branch per element).
template <typename T>
struct Num {
  static inline float f(T x) { return static_cast<float>(x); }
  static inline T r(float v) { return static_cast<T>(v); }
};

template <>
struct Num<c10::BFloat16> {
  static inline float f(c10::BFloat16 x) {
    const uint32_t u = static_cast<uint32_t>(x.x) << 16;
    float v;
    std::memcpy(&v, &u, 4);
    return v;
  }
  static inline c10::BFloat16 r(float v) {  // round to nearest even; NaN -> 0x7FC0 (c10's rule)
    uint32_t u;
    std::memcpy(&u, &v, 4);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded;
    return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
  }
};

// x @ W.T + b through oneDNN's prepacked weight (kernels.py packs it), called boxed so that the
// op's exact C++ signature does not matter.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(b);
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<c10::optional<at::Scalar>>());
  stack.emplace_back(c10::optional<std::string>());
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, bool packed) {
  return packed ? packed_linear(x, w, b) : at::linear(x, w, b);
}

// The ATen sequences the fused loops below replace (fast.py's _rms and _rotate + cache copies);
// used for many rows (prefill), where ATen's vectorized kernels are faster than the fused loops.
at::Tensor rms_aten(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor h = x.to(at::kFloat);
  h = h * at::rsqrt(h.pow(2).mean({-1}, true) + eps);
  return w * h.to(x.scalar_type());
}

at::Tensor rotate_aten(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor rot = at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  return x * cos + rot * sin;
}

// transformers' LlamaRMSNorm: normalise in fp32, cast back, scale. The mean of squares is ATen's
// (its summation order is its own); the rest — add eps, rsqrt, multiply, cast back, scale — is one
// pass rounding exactly as the ATen ops round (float math, round to nearest even), so the result
// is bit-identical to fast.py's _rms (tested).
at::Tensor rms(const at::Tensor& x, const at::Tensor& w, double eps) {
  const at::Tensor xc = x.contiguous();
  TORCH_CHECK(w.scalar_type() == xc.scalar_type() && w.is_contiguous() && w.numel() == xc.size(-1),
              "rms: the norm weight must be a contiguous [H] tensor of the input's dtype");
  const at::Tensor var = xc.to(at::kFloat).pow(2).mean({-1}, false);  // [rows] fp32
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.size(-1), rows = xc.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "rms", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const float* vp = var.const_data_ptr<float>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float e = static_cast<float>(eps);
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float inv = 1.0f / std::sqrt(vp[r] + e);
        const scalar_t* __restrict__ xr = xp + r * n;
        scalar_t* __restrict__ orow = op + r * n;
        using N = Num<scalar_t>;
        for (int64_t j = 0; j < n; ++j) {
          orow[j] = N::r(N::f(wp[j]) * N::f(N::r(N::f(xr[j]) * inv)));
        }
      }
    });
  });
  return out;
}

// x * cos + rotate_half(x) * sin for q and k, with k and v written straight into the cache: one
// pass instead of ~16 ATen calls. Each product and the sum are rounded to the tensor's dtype as
// ATen's elementwise ops round them (compute in float, round to nearest even), so the result is
// bit-identical to the Python loop's rotate + cache copies (tested).
// qkv: [B, T, (Hq + 2 Hkv) D] contiguous; cos, sin: [B, 1, T, D] contiguous; kc, vc: [B, Hkv, C, D].
// Returns q rotated, [B, Hq, T, D] (a view of [B, T, Hq, D] memory); writes kc, vc at cache index past .. past + T - 1.
at::Tensor rope_qkv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kc,
                    const at::Tensor& vc, int64_t past, int64_t hq, int64_t hk, int64_t d) {
  const int64_t b = qkv.size(0), t = qkv.size(1), heads = hq + 2 * hk, half = d / 2;
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == qkv.scalar_type()
              && sin.scalar_type() == qkv.scalar_type() && kc.scalar_type() == qkv.scalar_type()
              && vc.scalar_type() == qkv.scalar_type() && cos.numel() == b * t * d,
              "rope_qkv: qkv, cos, sin and the cache must be contiguous tensors of one dtype");
  at::Tensor q = at::empty({b, t, hq, d}, qkv.options());  // the layout ATen's ops give the Python loop's q
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_qkv", [&] {
    const scalar_t* src = qkv.const_data_ptr<scalar_t>();
    const scalar_t* cp = cos.const_data_ptr<scalar_t>();
    const scalar_t* sp = sin.const_data_ptr<scalar_t>();
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = kc.data_ptr<scalar_t>();
    scalar_t* vp = vc.data_ptr<scalar_t>();
    const int64_t kb = kc.stride(0), kh = kc.stride(1), kt = kc.stride(2);
    const int64_t vb = vc.stride(0), vh = vc.stride(1), vt = vc.stride(2);
    using N = Num<scalar_t>;
    auto mul = [](scalar_t x, scalar_t y) { return N::r(N::f(x) * N::f(y)); };
    auto add = [](scalar_t x, scalar_t y) { return N::r(N::f(x) + N::f(y)); };
    at::parallel_for(0, b * t * heads, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t bt = r / heads, h = r % heads, bi = bt / t, ti = bt % t;
        const scalar_t* __restrict__ x = src + r * d;
        if (h >= hq + hk) {  // v: a plain copy into the cache
          scalar_t* out = vp + bi * vb + (h - hq - hk) * vh + (past + ti) * vt;
          std::memcpy(out, x, d * sizeof(scalar_t));
          continue;
        }
        scalar_t* __restrict__ out = h < hq ? qp + (bt * hq + h) * d : kp + bi * kb + (h - hq) * kh + (past + ti) * kt;
        const scalar_t* __restrict__ c = cp + bt * d;
        const scalar_t* __restrict__ s = sp + bt * d;
        for (int64_t j = 0; j < half; ++j) {
          out[j] = add(mul(x[j], c[j]), N::r(-N::f(mul(x[j + half], s[j]))));  // (-x2) * s == -(x2 * s), exactly
          out[j + half] = add(mul(x[j + half], c[j + half]), mul(x[j], s[j + half]));
        }
      }
    });
  });
  return q.transpose(1, 2);
}

at::Tensor activation(const at::Tensor& x, int64_t act) {
  if (act == 0) return at::silu(x);
  return at::gelu(x, act == 1 ? "none" : "tanh");
}

}  // namespace

// x: [B, T, H] layer input; cos, sin: [B, 1, T, D]; bias: [B, 1, T, S] additive mask (S = past + T);
// weights: 8 per layer (input norm|None, qkv, qkv bias|None, o, o bias|None, post-attention norm,
// gate_up, down); k_cache, v_cache: [L, B, Hkv, C, D], written at past..S-1; act: 0 silu, 1 gelu,
// 2 gelu (tanh). Returns the last layer's output, after final_norm unless it is None, [B, T, H].
at::Tensor decoder_forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& bias,
                           const std::vector<c10::optional<at::Tensor>>& weights,
                           const c10::optional<at::Tensor>& final_norm,
                           at::Tensor k_cache, at::Tensor v_cache, int64_t past, int64_t hq, int64_t hk, int64_t d,
                           int64_t inter, double eps, double scale, bool packed, int64_t act) {
  c10::InferenceMode guard;
  const at::Tensor cos_c = cos.contiguous(), sin_c = sin.contiguous();
  const int64_t b = x.size(0), t = x.size(1), s = past + t, g = hq / hk;
  const int64_t n_layers = static_cast<int64_t>(weights.size() / 8);
  const bool fused = b * t <= 64;  // decode, verify and draft steps; a prefill takes ATen's kernels
  auto norm = [&](const at::Tensor& v, const at::Tensor& weight) { return fused ? rms(v, weight, eps) : rms_aten(v, weight, eps); };
  for (int64_t i = 0; i < n_layers; ++i) {
    const auto* w = &weights[8 * i];
    at::Tensor h = w[0].has_value() ? norm(x, *w[0]) : x;  // EAGLE's draft layer has no input norm
    at::Tensor qkv = linear(h, *w[1], w[2], packed);  // [B, T, (Hq + 2 Hkv) D]
    at::Tensor kc = k_cache.select(0, i), vc = v_cache.select(0, i);  // [B, Hkv, C, D]
    at::Tensor q;  // [B, Hq, T, D], with k and v written to the cache at past ..
    if (fused) {
      q = rope_qkv(qkv.contiguous(), cos_c, sin_c, kc, vc, past, hq, hk, d);
    } else {
      auto parts = qkv.split_with_sizes({hq * d, hk * d, hk * d}, -1);
      q = rotate_aten(parts[0].view({b, t, hq, d}).transpose(1, 2), cos, sin);
      kc.slice(2, past, s).copy_(rotate_aten(parts[1].view({b, t, hk, d}).transpose(1, 2), cos, sin));
      vc.slice(2, past, s).copy_(parts[2].view({b, t, hk, d}).transpose(1, 2));
    }
    at::Tensor keys = kc.slice(2, 0, s), vals = vc.slice(2, 0, s);  // [B, Hkv, S, D]
    at::Tensor o = at::scaled_dot_product_attention(q, keys, vals, bias, 0.0, false, scale, g > 1);  // [B, Hq, T, D]
    x = x + linear(o.transpose(1, 2).reshape({b, t, hq * d}), *w[3], w[4], packed);
    h = norm(x, *w[5]);
    at::Tensor gu = linear(h, *w[6], c10::nullopt, packed);
    x = x + linear(activation(gu.slice(-1, 0, inter), act) * gu.slice(-1, inter), *w[7], c10::nullopt, packed);
  }
  return final_norm.has_value() ? norm(x, *final_norm) : x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decoder_forward", &decoder_forward, "the lean decoder stack (see fast.py)");
  m.def("rms", &rms, "fused RMSNorm (bit-identical to fast._rms)");
  m.def("rms_aten", &rms_aten, "RMSNorm as ATen ops");
}
