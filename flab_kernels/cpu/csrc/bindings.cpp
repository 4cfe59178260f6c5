// Python bindings of the kernels on tensors (tensor_ops.h) and of the decode stack (decode_stack.h).
#include <torch/extension.h>

#include "amx.h"
#include "decode_stack.h"
#include "gemv.h"
#include "tensor_ops.h"
#include "vec.h"

namespace py = pybind11;

// each instruction set's variant is its own module in one process (tests load several): its classes stay local
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using flab::GemvWeight;
  m.def("isa", [] { return std::string(flab::kIsa); }, "the instruction set this variant was built for");
  m.def("has_amx", &flab::amx_ready, "bf16 products of many rows on AMX tiles (this variant, and the OS allows it)");
  m.def("has_bf16_dot", &flab::has_bf16_dot, "bf16 pairs multiplied natively (AVX512-BF16)");
  m.attr("EVERY_ROW_COUNT") = flab::kEveryRow;  // linear_max_rows of a product that takes every row count
  m.def("linear_max_rows", &flab::linear_max_rows, "the most rows for which linear / linear_int8 beat oneDNN here");
  m.def("linear", &flab::linear, "x (M, K) @ packed W.T (+ fp32 bias) -> (M, N)");
  m.def("linear_int8", &flab::linear_int8, "x (M, K) @ (int8 packed Q * scales).T (+ fp32 bias) -> (M, N)");
  m.def("linear_int4", &flab::linear_int4, "x (M, K) @ (int4 group-wise W).T (+ fp32 bias) -> (M, N)", py::arg("x"),
        py::arg("packed"), py::arg("scales"), py::arg("offsets"), py::arg("bias"), py::arg("N"), py::arg("K"),
        py::arg("group_size"), py::arg("mm_rows") = flab::kInt4MmRows);
  m.def("rms_norm", &flab::rms_norm, "RMSNorm with optional residual add -> (out, x + residual)");
  m.def("rope", &flab::rope, "rotary embedding in place over (T, heads * D) rows");
  m.def("silu_and_mul", &flab::silu_and_mul, "silu(x[:, :I]) * x[:, I:]");
  m.def("store_kv", &flab::store_kv, "the new tokens' K / V rows into their cache slots");
  m.def("paged_decode", &flab::paged_decode, "paged decode attention over the KV cache in place");

  py::class_<GemvWeight>(m, "GemvWeight", py::module_local(), "a packed weight and its kernel; called on (M, K) rows -> (M, N)")
      .def(py::init([](const std::string& kind, torch::Tensor packed, c10::optional<torch::Tensor> scales,
                       c10::optional<torch::Tensor> offsets, c10::optional<torch::Tensor> bias, int64_t N, int64_t K,
                       int64_t group_size, int64_t max_rows, c10::optional<torch::Tensor> onednn,
                       c10::optional<torch::Tensor> onednn_bias, py::object module) {
             const auto k = kind == "dense"  ? GemvWeight::Kind::kDense
                            : kind == "int8" ? GemvWeight::Kind::kInt8
                            : kind == "int4" ? GemvWeight::Kind::kInt4
                                             : throw std::invalid_argument("GemvWeight: kind must be dense, int8 or int4");
             TORCH_CHECK(k == GemvWeight::Kind::kDense || scales, "GemvWeight: ", kind, " needs scales");
             TORCH_CHECK(k != GemvWeight::Kind::kInt4 || offsets, "GemvWeight: int4 needs offsets");
             return GemvWeight{k,         std::move(packed), scales.value_or(torch::Tensor()),
                               offsets.value_or(torch::Tensor()), std::move(bias), N, K, group_size, max_rows,
                               std::move(onednn), std::move(onednn_bias), std::move(module)};
           }),
           py::arg("kind"), py::arg("packed"), py::arg("scales"), py::arg("offsets"), py::arg("bias"), py::arg("N"),
           py::arg("K"), py::arg("group_size") = 0, py::arg("max_rows") = INT64_MAX, py::arg("onednn") = py::none(),
           py::arg("onednn_bias") = py::none(), py::arg("module") = py::none())
      .def("__call__", &GemvWeight::operator(), py::arg("x"));
  py::class_<flab::RmsNormWeight>(m, "RmsNormWeight", py::module_local())
      .def(py::init([](torch::Tensor weight, double eps, double offset) {
             return flab::RmsNormWeight{std::move(weight), eps, offset};
           }),
           py::arg("weight"), py::arg("eps"), py::arg("offset"));
  py::class_<flab::DecodeLayer>(m, "DecodeLayer", py::module_local(), "one decoder layer's weights and attention options")
      .def(py::init([](flab::RmsNormWeight input_norm, flab::RmsNormWeight post_attention_norm,
                       c10::optional<flab::RmsNormWeight> q_norm, c10::optional<flab::RmsNormWeight> k_norm,
                       GemvWeight qkv, GemvWeight o, GemvWeight gate_up, GemvWeight down, int64_t num_heads,
                       int64_t num_kv_heads, int64_t head_dim, int64_t cache_slot, double scale, double softcap,
                       int64_t window) {
             return flab::DecodeLayer{std::move(input_norm), std::move(post_attention_norm), std::move(q_norm),
                                      std::move(k_norm), std::move(qkv), std::move(o), std::move(gate_up),
                                      std::move(down), num_heads, num_kv_heads, head_dim, cache_slot, scale,
                                      softcap, window};
           }),
           py::arg("input_norm"), py::arg("post_attention_norm"), py::arg("q_norm"), py::arg("k_norm"), py::arg("qkv"),
           py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("num_heads"), py::arg("num_kv_heads"),
           py::arg("head_dim"), py::arg("cache_slot"), py::arg("scale"), py::arg("softcap"), py::arg("window"));
  py::class_<flab::DecodeStack>(m, "DecodeStack", py::module_local(), "a decode step through every layer in one call")
      .def(py::init<std::vector<flab::DecodeLayer>>(), py::arg("layers"))
      .def("__len__", &flab::DecodeStack::size)
      .def("forward", &flab::DecodeStack::forward, py::call_guard<py::gil_scoped_release>(), py::arg("h"), py::arg("residual"), py::arg("cos"), py::arg("sin"),
           py::arg("k_caches"), py::arg("v_caches"), py::arg("slots"), py::arg("block_tables"), py::arg("seq_lens"));
}
