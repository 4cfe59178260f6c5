// The packed weights' vectors, shared by the GEMV tiles (gemv.cpp) and the AMX tiles (amx.cpp): loads that widen
// a packing's elements to fp32 lanes (simd.h's vectors), the int4 scale / offset rule, and the write of a tile's
// fp32 accumulators to the output rows. One variant per instruction set, as the rest of csrc/.
#pragma once

#include <algorithm>
#include <cstdint>

#include "gemv.h"
#include "simd.h"
#include "vec.h"

namespace flab::packed {

using simd::L;
using simd::vf;
using simd::vfma;
using simd::vload;
using simd::vstore;
inline vf vzero() { return simd::vset(0.0f); }
inline vf vbcast(float f) { return simd::vset(f); }
inline vf vload_bf16(const uint16_t* p) { return simd::vload(p); }  // L bf16 -> fp32
inline void vstore_bf16(uint16_t* p, vf v) { simd::vstore(p, v); }  // rounded to nearest even, as f32_to_bf16

#if defined(__AVX512F__)
inline vf vload_i8(const int8_t* p) {  // L int8 -> fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void vnibbles(const uint8_t* p, vf& lo, vf& hi) {  // L bytes -> (low nibbles, high nibbles) as fp32
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xf)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
inline void vpairs(const uint16_t* p, vf& even, vf& odd) {  // L bf16 pairs -> (w[., k], w[., k + 1]) as fp32
  __m512i v = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
#elif defined(__AVX2__) && defined(__FMA__)
inline vf vload_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void vnibbles(const uint8_t* p, vf& lo, vf& hi) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xf)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}
inline void vpairs(const uint16_t* p, vf& even, vf& odd) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
#else
#error "flab CPU kernels need AVX2 + FMA at least"
#endif

// int4 scales / offsets of L rows: fp32 as stored (w = code * scale + offset); bf16 pairs of torch's cpu_int4pack
// (w = (code - 8) * scale + offset) widened, the code bias folded into the offset: offset - 8 * scale, one fp32
// rounding (8 * scale is exact), the value the fp32 packing stores
inline void vscale(const float* s, const float* o, vf& sv, vf& ov) {
  sv = vload(s);
  ov = vload(o);
}
inline void vscale(const uint16_t* s, const uint16_t* o, vf& sv, vf& ov) {
  sv = vload_bf16(s);
  ov = vfma(vbcast(-8.0f), sv, vload_bf16(o));
}

// acc (mt rows of nb * 16) (* scales) + bias -> out rows m0.., columns of blocks blk.. (only the N real columns):
// whole vectors where the row has them (simd.h: the same fp32 operations in the same order, bf16 rounded as
// f32_to_bf16), the columns past the last whole vector one by one
inline void write_tile(const float* acc, int mt, int nb, int64_t m0, int64_t blk, const float* bias, int64_t N,
                       void* out, bool out_bf16, const float* scales = nullptr) {
  const int64_t n0 = blk * kBlock, n1 = std::min<int64_t>(N, n0 + nb * kBlock);
  const int64_t vec_end = n0 + (n1 - n0) / simd::L * simd::L;
  for (int m = 0; m < mt; ++m) {
    const float* a = acc + m * nb * kBlock - n0;  // a[n]: column n
    const int64_t row = (m0 + m) * N;
    for (int64_t n = n0; n < vec_end; n += simd::L) {
      simd::vf v = simd::vload(a + n);
      if (scales) v = simd::vmul(v, simd::vload(scales + n));
      if (bias) v = simd::vadd(v, simd::vload(bias + n));
      if (out_bf16)
        simd::vstore(static_cast<uint16_t*>(out) + row + n, v);
      else
        simd::vstore(static_cast<float*>(out) + row + n, v);
    }
    for (int64_t n = vec_end; n < n1; ++n) {
      const float v = a[n] * (scales ? scales[n] : 1.0f) + (bias ? bias[n] : 0.0f);
      if (out_bf16)
        static_cast<uint16_t*>(out)[row + n] = f32_to_bf16(v);
      else
        static_cast<float*>(out)[row + n] = v;
    }
  }
}

}  // namespace flab::packed
