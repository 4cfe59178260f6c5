// RMSNorm with the residual add and SiLU-and-mul, with the roundings of transformers' modules:
//   h = (x + residual) in the model dtype
//   offset 0 (Llama): out = weight * (h * rsqrt(mean(h^2) + eps)).to(dtype)        (product in the model dtype)
//   offset 1 (Gemma): out = (h * rsqrt(mean(h^2) + eps) * (offset + weight)).to(dtype)
//   silu:             out = (silu(g).to(dtype) * u).to(dtype)
// Only the order of the fp32 sum of squares differs from torch's (vectorized by the compiler here).
#include "norm_act.h"

#include <cmath>
#include <vector>

#include "simd.h"
#include "vec.h"

namespace flab {

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
inline float round_to(float v, const float*) { return v; }
inline float round_to(float v, const uint16_t*) { return round_bf16(v); }

}  // namespace

template <typename T>
void rms_norm_row(const T* x, const T* residual, const T* weight, float eps, float offset, int64_t H, T* out,
                  T* res_out) {
  float sum = 0.0f;
  if (residual != nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < H; ++i) {
      const float h = round_to(load(x, i) + load(residual, i), x);
      store(res_out, i, h);
      sum += h * h;
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < H; ++i) {
      const float h = load(x, i);
      sum += h * h;
    }
  }
  const T* h = residual != nullptr ? res_out : x;
  const float scale = 1.0f / std::sqrt(sum / static_cast<float>(H) + eps);
  if (offset == 0.0f) {
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) store(out, i, load(weight, i) * round_to(load(h, i) * scale, x));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) store(out, i, load(h, i) * scale * (offset + load(weight, i)));
  }
}

namespace {

using namespace simd;

inline vf vround_to(vf v, const float*) { return v; }
inline vf vround_to(vf v, const uint16_t*) { return vround_bf16(v); }

}  // namespace

template <typename T>
void silu_and_mul_row(const T* x, int64_t I, T* out) {
  const T* up = x + I;
  int64_t i = 0;
  for (; i + L <= I; i += L) {
    const vf g = vload(x + i);
    const vf act = vround_to(g / (vset(1.0f) + vexp(-g)), x);
    vstore(out + i, act * vload(up + i));
  }
  for (; i < I; ++i) {
    const float g = load(x, i);
    const float act = round_to(g / (1.0f + std::exp(-g)), x);
    store(out, i, act * load(up, i));
  }
}

template <typename T>
void rope_row(T* x, const T* cos, const T* sin, int64_t heads, int64_t D, int64_t rd) {
  const int64_t h2 = rd / 2;
  for (int64_t h = 0; h < heads; ++h) {
    T* p = x + h * D;
    for (int64_t i = 0; i < h2; ++i) {  // no FMA contraction (-ffp-contract=off): fp32 rounds as torch
      const float a = load(p, i), b = load(p, i + h2);
      const float lo = round_to(a * load(cos, i), p) + round_to(b * load(sin, i), p);
      const float hi = round_to(b * load(cos, i + h2), p) + round_to(a * load(sin, i + h2), p);
      store(p, i, lo);
      store(p, i + h2, hi);
    }
  }
}

template void rope_row<float>(float*, const float*, const float*, int64_t, int64_t, int64_t);
template void rope_row<uint16_t>(uint16_t*, const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t);
template void rms_norm_row<float>(const float*, const float*, const float*, float, float, int64_t, float*, float*);
template void rms_norm_row<uint16_t>(const uint16_t*, const uint16_t*, const uint16_t*, float, float, int64_t,
                                     uint16_t*, uint16_t*);
template void silu_and_mul_row<float>(const float*, int64_t, float*);
template void silu_and_mul_row<uint16_t>(const uint16_t*, int64_t, uint16_t*);

}  // namespace flab
