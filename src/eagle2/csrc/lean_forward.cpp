// The lean forward's decoder stack in C++: the same ATen calls as fast.py's Python loop, minus
// the Python interpreter between them.
//
// A small model's forward on a CPU is ~2000 tiny tensor ops; in Python each costs a few
// microseconds of interpreter and binding overhead on top of its kernel. This file runs the very
// same ops, in the same order and with the same arguments, from C++ — so its output is
// bit-identical to FastTarget's Python forward (a test checks it), only cheaper to launch.
// It knows nothing of models: Python hands it the weights, the caches and the rotary rows.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <vector>

namespace {

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

// transformers' LlamaRMSNorm: normalise in fp32, cast back, scale.
at::Tensor rms(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor h = x.to(at::kFloat);
  h = h * at::rsqrt(h.pow(2).mean({-1}, true) + eps);
  return w * h.to(x.scalar_type());
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor rot = at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  return x * cos + rot * sin;
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
  const int64_t b = x.size(0), t = x.size(1), s = past + t, g = hq / hk;
  const int64_t n_layers = static_cast<int64_t>(weights.size() / 8);
  for (int64_t i = 0; i < n_layers; ++i) {
    const auto* w = &weights[8 * i];
    at::Tensor h = w[0].has_value() ? rms(x, *w[0], eps) : x;  // EAGLE's draft layer has no input norm
    at::Tensor qkv = linear(h, *w[1], w[2], packed);  // [B, T, (Hq + 2 Hkv) D]
    auto parts = qkv.split_with_sizes({hq * d, hk * d, hk * d}, -1);
    at::Tensor q = rotate(parts[0].view({b, t, hq, d}).transpose(1, 2), cos, sin);  // [B, Hq, T, D]
    at::Tensor k = rotate(parts[1].view({b, t, hk, d}).transpose(1, 2), cos, sin);  // [B, Hkv, T, D]
    at::Tensor kc = k_cache.select(0, i), vc = v_cache.select(0, i);  // [B, Hkv, C, D]
    kc.slice(2, past, s).copy_(k);
    vc.slice(2, past, s).copy_(parts[2].view({b, t, hk, d}).transpose(1, 2));
    at::Tensor keys = kc.slice(2, 0, s), vals = vc.slice(2, 0, s);  // [B, Hkv, S, D]
    at::Tensor o = at::scaled_dot_product_attention(q, keys, vals, bias, 0.0, false, scale, g > 1);  // [B, Hq, T, D]
    x = x + linear(o.transpose(1, 2).reshape({b, t, hq * d}), *w[3], w[4], packed);
    h = rms(x, *w[5], eps);
    at::Tensor gu = linear(h, *w[6], c10::nullopt, packed);
    x = x + linear(activation(gu.slice(-1, 0, inter), act) * gu.slice(-1, inter), *w[7], c10::nullopt, packed);
  }
  return final_norm.has_value() ? rms(x, *final_norm, eps) : x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decoder_forward", &decoder_forward, "the lean decoder stack (see fast.py)");
}
