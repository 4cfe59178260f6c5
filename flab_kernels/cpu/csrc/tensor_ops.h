// The kernels on tensors (tensor_ops.cpp): each checks its inputs (TORCH_CHECK), allocates its output and shares the
// work among the threads. Python calls them through bindings.cpp; the decode stack (decode_stack.cpp) calls them
// in a row, so both paths run the same code.
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace flab {

// x (M, K) -> (M, N) = x @ W.T + bias, W packed by flab_kernels/cpu/ops.py (bf16 [NB][KP][16][2], fp32 [NB][K][16]).
// Up to kGemvMaxRows rows the GEMV tiles; more rows of bf16 x on bf16 weights run on AMX tiles where this variant
// has them and K is a multiple of 32, else the GEMV tiles again (4 rows at a time)
constexpr int64_t kGemvMaxRows = 4;
// bf16 weights on AVX512: our product up to this many rows. Measured on the 121 products of a SmolLM2-135M step,
// weights from memory, both cores, against oneDNN capped to the same instruction set (ONEDNN_MAX_CPU_ISA;
// docs/cpu_kernels.md): AMX tiles 10.7 vs 14.8 ms at 32 rows (even at 64); AVX512-BF16 GEMV tiles 12.3 vs 15.6 ms
// at 5 rows, 44.9 vs 47.4 at 32; AVX512 without BF16 13.3 vs 31.5 at 5, 33.8 vs 123.5 at 32. A weight AMX cannot
// take (K not a multiple of 32) on a CPU whose oneDNN has AMX: kGemvMaxRows
constexpr int64_t kBf16MaxRows = 32;
// int8 weights: our tiles (AMX for bf16 x where it runs, else the AVX512 GEMV tiles) were ahead of torch's
// _weight_int8pack_mm, the quantized module's own product, at every row count measured (4-2048, docs/cpu_kernels.md):
// every row count there; the AVX2 tiles (one row at a time) up to kGemvMaxRows
constexpr int64_t kEveryRow = INT64_MAX;
// the most rows for which `linear` (int8 packing: `linear_int8`) is the product to run on this weight; above, oneDNN
// or the quantized module (what the linear wraps) is faster
int64_t linear_max_rows(const torch::Tensor& packed);
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                     int64_t N, int64_t K);
// x (M, K) bf16 / fp32 -> (M, N) in x's dtype: (x @ Q.T) * scales + bias, Q int8 packed [NB][K][16]
torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const c10::optional<torch::Tensor>& bias, int64_t N, int64_t K);
// x (M, K) bf16 / fp32 -> (M, N) in x's dtype: x @ W.T + bias, W int4 group-wise (gemv.h): fp32 scales / offsets
// w = code * scale + offset, bf16 ones (torch's cpu_int4pack pairs) w = (code - 8) * scale + offset. Below mm_rows
// rows the group-wise tile over the packed codes (the codes read once for every row: the rows loop inside each
// block); from mm_rows on the weight dequantized once into W^T of x's dtype (bf16: rounded once) and torch's GEMM
constexpr int64_t kInt4MmRows = 32;  // measured (docs/cpu_kernels.md, backend/tools/bench_int4_rows.py)
// bf16 x on AMX, kInt4AmxMinRows to kInt4AmxMaxRows rows: each pair of blocks dequantized once into AMX B tiles
// (rounded to bf16, as the many-row route rounds it; no W^T copy). Measured on SmolLM2-135M's 120 layer products,
// both cores (docs/cpu_kernels.md): 6 rows 8.1 ms against the group-wise tile's 7.5, 8 rows 8.0 / 8.8, 32 rows 9.8
// against dequantize + GEMM's 34.7, 512 rows 53.5 / 62.9, 2048 rows 256 / 157
constexpr int64_t kInt4AmxMinRows = 8, kInt4AmxMaxRows = 512;
torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const torch::Tensor& offsets, const c10::optional<torch::Tensor>& bias, int64_t N, int64_t K,
                          int64_t group_size, int64_t mm_rows = kInt4MmRows);
// x (T, H) [+ residual (T, H)] -> (out, x + residual); without residual the second tensor is empty
std::tuple<torch::Tensor, torch::Tensor> rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                                  const torch::Tensor& weight, double eps, double offset);
// in place: x (T, >= heads * D) rows (unit column stride), cos / sin (T, 1, rd) of x's dtype (rotary.py rope_step)
void rope(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads, int64_t D);
// x (T, 2I) -> (T, I): silu(x[:, :I]) * x[:, I:]
torch::Tensor silu_and_mul(const torch::Tensor& x);
// the new tokens' K / V rows (T, Hkv * D / Dv, unit column stride) into the caches' slots (T,) int64
void store_kv(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_cache, torch::Tensor& v_cache,
              const torch::Tensor& slots);
// q (S, Hq, D) one new token per sequence, caches (NB, BS, Hkv, D / Dv) read in place -> (S, Hq, Dv)
torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& seq_lens, double scale,
                           double softcap, int64_t window, const c10::optional<torch::Tensor>& sinks);

}  // namespace flab
