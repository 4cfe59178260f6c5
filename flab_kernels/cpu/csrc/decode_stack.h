// A decode step of a Llama-style decoder stack in one call: for each layer RMSNorm (+ residual), the qkv product,
// the optional per-head q / k RMSNorm, RoPE in place, the K / V store, paged decode attention, the o product,
// RMSNorm + residual, gate_up, SiLU-and-mul, down. The same kernels (tensor_ops.h) in the same order as the
// per-module path (backend/layers/cpu/fused.py), so the results are the same bits; what goes is the Python between
// them (~10 module calls per layer). Products of more than `max_rows` rows run what the per-module path runs
// there: oneDNN's prepacked GEMM (`mkldnn::_linear_pointwise`, through the dispatcher) or the module itself (a
// Python callable, called with the GIL taken back). Built once at load (backend/layers/cpu/decode_stack.py).
#pragma once

#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace flab {

// A packed weight and the kernel that multiplies by it (tensor_ops.h linear / linear_int8 / linear_int4)
struct GemvWeight {
  enum class Kind { kDense, kInt8, kInt4 };
  Kind kind;
  torch::Tensor packed;                 // flab_kernels/cpu/ops.py packing of the kind
  torch::Tensor scales, offsets;        // int8: (N,) per-row scales; int4: (NB, G, 16) each; dense: empty
  c10::optional<torch::Tensor> bias;    // (N,) fp32
  int64_t N, K, group_size;             // group_size: int4 only
  int64_t max_rows;                     // more rows: `onednn` or `module`
  c10::optional<torch::Tensor> onednn, onednn_bias;  // oneDNN's prepacked weight and the module's bias
  pybind11::object module;              // else the module (x -> x @ W.T + b), None when there is neither

  torch::Tensor operator()(const torch::Tensor& x) const;  // (M, K) -> (M, N) in x's dtype
};

struct RmsNormWeight {
  torch::Tensor weight;  // (H,) in the activation dtype
  double eps, offset;
};

struct DecodeLayer {
  RmsNormWeight input_norm, post_attention_norm;
  c10::optional<RmsNormWeight> q_norm, k_norm;  // per head, over D (Qwen3)
  GemvWeight qkv, o, gate_up, down;
  int64_t num_heads, num_kv_heads, head_dim;
  int64_t cache_slot;  // index into the step's K / V cache lists
  double scale, softcap;  // softcap <= 0: none
  int64_t window;         // sliding window; <= 0: none
};

class DecodeStack {
 public:
  explicit DecodeStack(std::vector<DecodeLayer> layers) : layers_(std::move(layers)) {}
  ~DecodeStack();  // drops the modules' Python references with the GIL held
  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

  // h (T, H) the embeddings (residual none) or a layer's output with its residual; cos / sin (T, 1, rd) of h's
  // dtype; one new token per sequence (T = S), already given its slot. -> (h, residual) after the last layer
  std::tuple<torch::Tensor, torch::Tensor> forward(torch::Tensor h, c10::optional<torch::Tensor> residual,
                                                   const torch::Tensor& cos, const torch::Tensor& sin,
                                                   std::vector<torch::Tensor> k_caches,
                                                   std::vector<torch::Tensor> v_caches, const torch::Tensor& slots,
                                                   const torch::Tensor& block_tables,
                                                   const torch::Tensor& seq_lens) const;

 private:
  std::vector<DecodeLayer> layers_;
};

}  // namespace flab
