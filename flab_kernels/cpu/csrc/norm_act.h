// Row-wise fused decoder pieces (raw pointers, one row per call; threading in the caller).
#pragma once

#include <cstdint>

namespace flab {

// h = x (+ residual), rounded to the dtype; out = rms_norm(h) with HF's roundings (see norm_act.cpp);
// res_out (when residual is given) = h. T = uint16_t (bf16) or float.
template <typename T>
void rms_norm_row(const T* x, const T* residual, const T* weight, float eps, float offset, int64_t H, T* out,
                  T* res_out);

// out[i] = silu(x[i]) * x[I + i], each product rounded to the dtype as in HF (act_fn(gate) * up)
template <typename T>
void silu_and_mul_row(const T* x, int64_t I, T* out);

// rotary embedding (neox / rotate-half) in place over `heads` heads of D at x, the first rd of each rotated:
// x = x * cos + rotate_half(x) * sin with cos = [c | c], sin = [-s | s] (rd each, the step's values in the
// dtype), each product and the sum rounded to the dtype as in HF's torch expression
template <typename T>
void rope_row(T* x, const T* cos, const T* sin, int64_t heads, int64_t D, int64_t rd);

}  // namespace flab
