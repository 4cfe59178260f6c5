// RMSNorm with the residual add and SiLU-and-mul, with the roundings of transformers' modules:
//   h = (x + residual) in the model dtype
//   offset 0 (Llama): out = weight * (h * rsqrt(mean(h^2) + eps)).to(dtype)        (product in the model dtype)
//   offset 1 (Gemma): out = (h * rsqrt(mean(h^2) + eps) * (offset + weight)).to(dtype)
//   silu:             out = (silu(g).to(dtype) * u).to(dtype)
// Only the order of the fp32 sum of squares differs from torch's (vectorized by the compiler here).
#include "norm_act.h"

#include <cmath>
#include <vector>

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

// exp(x) for fp32 vectors: x = n ln2 + r (Cody-Waite, |r| <= ln2 / 2), e^r by Cephes' degree-6 polynomial, times
// 2^n; within 2 ulp of std::exp over [-87, 88] (inputs clamped there: silu's tails are 0 and x there anyway)
#if defined(__AVX512F__)
using vf = __m512;
constexpr int64_t L = 16;
inline vf vset(float f) { return _mm512_set1_ps(f); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vclamp(vf x, float lo, float hi) { return _mm512_min_ps(_mm512_max_ps(x, vset(lo)), vset(hi)); }
inline vf vround_nearest(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT); }
inline vf vfnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vtimes_pow2(vf y, vf n) { return _mm512_scalef_ps(y, n); }  // y * 2^n
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline __m512i vbf16_bits(vf v) {  // round to nearest even (NaN stays a quiet NaN), as f32_to_bf16, in 32-bit lanes
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
}
inline void vstore(uint16_t* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(vbf16_bits(v)));
}
inline vf vround_bf16(vf v) { return _mm512_castsi512_ps(_mm512_slli_epi32(vbf16_bits(v), 16)); }
#else  // AVX2 + FMA
using vf = __m256;
constexpr int64_t L = 8;
inline vf vset(float f) { return _mm256_set1_ps(f); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vclamp(vf x, float lo, float hi) { return _mm256_min_ps(_mm256_max_ps(x, vset(lo)), vset(hi)); }
inline vf vround_nearest(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vtimes_pow2(vf y, vf n) {  // y * 2^n, n in [-126, 127]: 2^n is a normal float
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline __m256i vbf16_bits(vf v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(r, quiet, nan);
}
inline vf vround_bf16(vf v) { return _mm256_castsi256_ps(_mm256_slli_epi32(vbf16_bits(v), 16)); }
inline void vstore(uint16_t* p, vf v) {
  const __m256i r = vbf16_bits(v);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // 8 x 16 bit, in order
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#endif

inline vf vexp(vf x) {
  x = vclamp(x, -87.0f, 88.0f);
  const vf n = vround_nearest(vmul(x, vset(1.44269504088896341f)));
  vf r = vfnma(n, vset(0.693359375f), x);
  r = vfnma(n, vset(-2.12194440e-4f), r);
  vf p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  return vtimes_pow2(vfma(p, vmul(r, r), vadd(r, vset(1.0f))), n);
}

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
