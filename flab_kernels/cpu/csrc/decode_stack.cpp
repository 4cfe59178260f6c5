// The decode stack (decode_stack.h): the per-module path's kernels, called in its order from one loop.
#include "decode_stack.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include "tensor_ops.h"

namespace flab {

namespace {

// oneDNN's product with a prepacked weight, as backend/layers/cpu/packed.py `packed_linear` calls it
torch::Tensor onednn_linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& b) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, packed, b, std::string("none"), c10::List<c10::optional<c10::Scalar>>(),
                                 std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

torch::Tensor GemvWeight::operator()(const torch::Tensor& x) const {
  if (x.size(0) > max_rows) {
    if (onednn) return onednn_linear(x, *onednn, onednn_bias);
    TORCH_CHECK(!module.is_none(), "GemvWeight: ", x.size(0), " rows and no product for more than ", max_rows);
    pybind11::gil_scoped_acquire gil;
    return module(x).cast<torch::Tensor>();
  }
  switch (kind) {
    case Kind::kDense: return linear(x, packed, bias, N, K);
    case Kind::kInt8: return linear_int8(x, packed, scales, bias, N, K);
    case Kind::kInt4: return linear_int4(x, packed, scales, offsets, bias, N, K, group_size);
  }
  TORCH_CHECK(false, "GemvWeight: unknown kind");
}

namespace {

// per-head RMSNorm in place over `heads` heads of D starting at column `first` of each row of x (T, W)
void head_norm_(torch::Tensor& x, int64_t first, int64_t heads, int64_t D, const RmsNormWeight& norm) {
  const int64_t T = x.size(0);
  auto view = x.narrow(1, first, heads * D);  // (T, heads * D), row stride W
  auto normed = std::get<0>(rms_norm(view.reshape({T * heads, D}).contiguous(), c10::nullopt, norm.weight, norm.eps,
                                     norm.offset));  // (T * heads, D)
  view.copy_(normed.view({T, heads * D}));
}

}  // namespace

DecodeStack::~DecodeStack() {
  pybind11::gil_scoped_acquire gil;
  layers_.clear();
}

std::tuple<torch::Tensor, torch::Tensor> DecodeStack::forward(torch::Tensor h, c10::optional<torch::Tensor> residual,
                                                              const torch::Tensor& cos, const torch::Tensor& sin,
                                                              std::vector<torch::Tensor> k_caches,
                                                              std::vector<torch::Tensor> v_caches,
                                                              const torch::Tensor& slots,
                                                              const torch::Tensor& block_tables,
                                                              const torch::Tensor& seq_lens) const {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "decode stack: h must be contiguous (T, H)");
  TORCH_CHECK(k_caches.size() == v_caches.size(), "decode stack: as many K as V caches");
  const int64_t T = h.size(0);
  torch::Tensor res = residual ? *residual : torch::Tensor();
  for (const DecodeLayer& L : layers_) {
    TORCH_CHECK(L.cache_slot >= 0 && L.cache_slot < static_cast<int64_t>(k_caches.size()),
                "decode stack: a layer's cache slot is outside the cache lists");
    torch::Tensor x;
    if (!res.defined()) {
      res = h;
      x = std::get<0>(rms_norm(h, c10::nullopt, L.input_norm.weight, L.input_norm.eps, L.input_norm.offset));
    } else {
      std::tie(x, res) = rms_norm(h, res, L.input_norm.weight, L.input_norm.eps, L.input_norm.offset);
    }
    const int64_t D = L.head_dim, q_size = L.num_heads * D, kv_size = L.num_kv_heads * D;
    torch::Tensor qkv = L.qkv(x);  // (T, q_size + 2 * kv_size)
    if (L.q_norm) head_norm_(qkv, 0, L.num_heads, D, *L.q_norm);
    if (L.k_norm) head_norm_(qkv, q_size, L.num_kv_heads, D, *L.k_norm);
    rope(qkv, cos, sin, L.num_heads + L.num_kv_heads, D);  // the q | k columns
    torch::Tensor& k_cache = k_caches[L.cache_slot];
    torch::Tensor& v_cache = v_caches[L.cache_slot];
    store_kv(qkv.narrow(1, q_size, kv_size), qkv.narrow(1, q_size + kv_size, kv_size), k_cache, v_cache, slots);
    torch::Tensor attn = paged_decode(qkv.narrow(1, 0, q_size).view({T, L.num_heads, D}), k_cache, v_cache,
                                      block_tables, seq_lens, L.scale, L.softcap, L.window, c10::nullopt);  // (T, Hq, D)
    h = L.o(attn.view({T, q_size}));
    std::tie(x, res) = rms_norm(h, res, L.post_attention_norm.weight, L.post_attention_norm.eps,
                                L.post_attention_norm.offset);
    h = L.down(silu_and_mul(L.gate_up(x)));
  }
  return {h, res};
}

}  // namespace flab
