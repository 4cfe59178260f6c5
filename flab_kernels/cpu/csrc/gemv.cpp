// GEMV / small-M GEMM over prepacked weights (layouts in gemv.h), one variant per instruction set.
//
// A tile is MT input rows x NB packed blocks (NB * 16 outputs): each weight vector is loaded once and used for
// MT rows, and NB independent accumulator chains hide the FMA latency while NB weight streams are in flight.
#include "gemv.h"

#include <algorithm>
#include <cstdlib>
#include <vector>

#if defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "simd.h"
#include "vec.h"

namespace flab {

namespace {

#if defined(__AVX512F__)
using vf = __m512;
constexpr int L = 16;  // fp32 lanes
constexpr int MT_MAX = 4, NB_MAX = 4;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vbcast(float f) { return _mm512_set1_ps(f); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vload_i8(const int8_t* p) {  // L int8 -> fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void vnibbles(const uint8_t* p, vf& lo, vf& hi) {  // L bytes -> (low nibbles, high nibbles) as fp32
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xf)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
inline vf vload_bf16(const uint16_t* p) {  // L bf16 -> fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void vpairs(const uint16_t* p, vf& even, vf& odd) {  // L bf16 pairs -> (w[., k], w[., k + 1]) as fp32
  __m512i v = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
#elif defined(__AVX2__) && defined(__FMA__)
using vf = __m256;
constexpr int L = 8;
constexpr int MT_MAX = 1, NB_MAX = 2;  // 16 ymm registers
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vbcast(float f) { return _mm256_set1_ps(f); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vload_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void vnibbles(const uint8_t* p, vf& lo, vf& hi) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xf)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}
inline vf vload_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline void vpairs(const uint16_t* p, vf& even, vf& odd) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
#else
#error "flab CPU kernels need AVX2 + FMA at least"
#endif

constexpr int R = kBlock / L;  // vectors per block row of 16 outputs

// bf16 weights, fp32 x: acc[m][b * 16 + j] = sum_k x[m, k] * w[block b, row j, k]
template <int MT, int NB>
void tile_bf16_f32x(const float* x, int64_t xs, const uint16_t* w, int64_t KP, float* acc_out) {
  vf acc[MT][NB * R];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB * R; ++j) acc[m][j] = vzero();
  const int64_t bs = KP * 2 * kBlock;
  for (int64_t p = 0; p < KP; ++p) {
    vf even[NB * R], odd[NB * R];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) vpairs(w + b * bs + p * 2 * kBlock + r * 2 * L, even[b * R + r], odd[b * R + r]);
    for (int m = 0; m < MT; ++m) {
      const vf x0 = vbcast(x[m * xs + 2 * p]), x1 = vbcast(x[m * xs + 2 * p + 1]);
      for (int j = 0; j < NB * R; ++j) acc[m][j] = vfma(odd[j], x1, vfma(even[j], x0, acc[m][j]));
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB * R; ++j) vstore(acc_out + m * NB * kBlock + j * L, acc[m][j]);
}

#if defined(__AVX512BF16__)
// bf16 weights, bf16 x: one vdpbf16ps multiplies 16 pairs of one block against one broadcast pair of x
template <int MT, int NB>
void tile_bf16_dot(const uint16_t* x, int64_t xs, const uint16_t* w, int64_t KP, float* acc_out) {
  __m512 acc[MT][NB];
  for (int m = 0; m < MT; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  const int64_t bs = KP * 2 * kBlock;
  for (int64_t p = 0; p < KP; ++p) {
    __m512i wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_si512(w + b * bs + p * 2 * kBlock);
    for (int m = 0; m < MT; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * xs + 2 * p, 4);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], (__m512bh)wv[b], xv);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(acc_out + m * NB * kBlock + b * kBlock, acc[m][b]);
}
#endif

template <int MT, int NB>
void tile_f32(const float* x, int64_t xs, const float* w, int64_t K, float* acc_out) {
  vf acc[MT][NB * R];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB * R; ++j) acc[m][j] = vzero();
  const int64_t bs = K * kBlock;
  for (int64_t k = 0; k < K; ++k) {
    vf wv[NB * R];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) wv[b * R + r] = vload(w + b * bs + k * kBlock + r * L);
    for (int m = 0; m < MT; ++m) {
      const vf xv = vbcast(x[m * xs + k]);
      for (int j = 0; j < NB * R; ++j) acc[m][j] = vfma(wv[j], xv, acc[m][j]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB * R; ++j) vstore(acc_out + m * NB * kBlock + j * L, acc[m][j]);
}

template <int MT, int NB>
void tile_i8(const float* x, int64_t xs, const int8_t* w, int64_t K, float* acc_out) {
  vf acc[MT][NB * R];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB * R; ++j) acc[m][j] = vzero();
  const int64_t bs = K * kBlock;
  for (int64_t k = 0; k < K; ++k) {
    vf wv[NB * R];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) wv[b * R + r] = vload_i8(w + b * bs + k * kBlock + r * L);
    for (int m = 0; m < MT; ++m) {
      const vf xv = vbcast(x[m * xs + k]);
      for (int j = 0; j < NB * R; ++j) acc[m][j] = vfma(wv[j], xv, acc[m][j]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB * R; ++j) vstore(acc_out + m * NB * kBlock + j * L, acc[m][j]);
}

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

// int4 group-wise: per group, the partial sums of x times the raw codes (0..15), then times the group's scale
// plus its offset times the sum of x over the group (w = code * scale + offset); S: the scales' storage
template <int MT, int NB, typename S>
void tile_i4(const float* x, int64_t xs, const float* xsum, int64_t G, const uint8_t* w, int64_t KP, int64_t gp,
             const S* sc, const S* of, float* acc_out) {
  vf acc[MT][NB * R];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB * R; ++j) acc[m][j] = vzero();
  const int64_t bs = KP * kBlock, ss = G * kBlock;
  for (int64_t g = 0; g < G; ++g) {
    vf part[MT][NB * R];
    for (int m = 0; m < MT; ++m)
      for (int j = 0; j < NB * R; ++j) part[m][j] = vzero();
    for (int64_t p = g * gp; p < (g + 1) * gp; ++p) {
      vf lo[NB * R], hi[NB * R];
      for (int b = 0; b < NB; ++b)
        for (int r = 0; r < R; ++r) vnibbles(w + b * bs + p * kBlock + r * L, lo[b * R + r], hi[b * R + r]);
      for (int m = 0; m < MT; ++m) {
        const vf x0 = vbcast(x[m * xs + 2 * p]), x1 = vbcast(x[m * xs + 2 * p + 1]);
        for (int j = 0; j < NB * R; ++j) part[m][j] = vfma(hi[j], x1, vfma(lo[j], x0, part[m][j]));
      }
    }
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) {
        vf s, o;
        vscale(sc + b * ss + g * kBlock + r * L, of + b * ss + g * kBlock + r * L, s, o);
        for (int m = 0; m < MT; ++m)
          acc[m][b * R + r] = vfma(part[m][b * R + r], s, vfma(o, vbcast(xsum[m * G + g]), acc[m][b * R + r]));
      }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB * R; ++j) vstore(acc_out + m * NB * kBlock + j * L, acc[m][j]);
}

// fp32 -> bf16 bits, round to nearest even (f32_to_bf16 in vec.h for finite values), in the low 16 bits of each lane
#if defined(__AVX512F__)
inline void vstore_bf16(uint16_t* p, vf v) {
  __m512i u = _mm512_castps_si512(v);
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                                         _mm512_set1_epi32(1))));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}
#else
inline void vstore_bf16(uint16_t* p, vf v) {
  __m256i u = _mm256_castps_si256(v);
  u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16),
                                                                                         _mm256_set1_epi32(1))));
  u = _mm256_srli_epi32(u, 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0x08);  // 8 x u16 in the low half
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#endif

// packed int4 blocks [b0, b1) -> rows k of W^T (K, ld): out[k, b * 16 + j] = code * scale + offset in fp32, stored
// fp32 or rounded once to bf16
template <typename S>
void dequant_i4_kn(const uint8_t* w, int64_t KP, int64_t G, int64_t gp, const S* sc, const S* of, int64_t ld,
                   int64_t b0, int64_t b1, void* out, bool out_bf16) {
  const int64_t bs = KP * kBlock, ss = G * kBlock;
  for (int64_t blk = b0; blk < b1; ++blk)
    for (int64_t g = 0; g < G; ++g)
      for (int r = 0; r < R; ++r) {
        vf s, o;
        vscale(sc + blk * ss + g * kBlock + r * L, of + blk * ss + g * kBlock + r * L, s, o);
        for (int64_t p = g * gp; p < (g + 1) * gp; ++p) {
          vf lo, hi;
          vnibbles(w + blk * bs + p * kBlock + r * L, lo, hi);
          const int64_t i = 2 * p * ld + blk * kBlock + r * L;
          if (out_bf16) {
            vstore_bf16(static_cast<uint16_t*>(out) + i, vfma(lo, s, o));
            vstore_bf16(static_cast<uint16_t*>(out) + i + ld, vfma(hi, s, o));
          } else {
            vstore(static_cast<float*>(out) + i, vfma(lo, s, o));
            vstore(static_cast<float*>(out) + i + ld, vfma(hi, s, o));
          }
        }
      }
}

// (mt, nb) -> the tile instantiation, for each kind of tile
template <typename Fn, template <int, int> class Tile, int NB>
Fn pick_m(int mt) {
  switch (mt) {
    case 1: return Tile<1, NB>::fn;
    case 2: return Tile<std::min(2, MT_MAX), NB>::fn;
    case 3: return Tile<std::min(3, MT_MAX), NB>::fn;
    default: return Tile<MT_MAX, NB>::fn;
  }
}
template <typename Fn, template <int, int> class Tile>
Fn pick(int mt, int nb) {
  switch (nb) {
    case 1: return pick_m<Fn, Tile, 1>(mt);
    case 2: return pick_m<Fn, Tile, std::min(2, NB_MAX)>(mt);
    case 3: return pick_m<Fn, Tile, std::min(3, NB_MAX)>(mt);
    default: return pick_m<Fn, Tile, NB_MAX>(mt);
  }
}

using TileBf16F32x = void (*)(const float*, int64_t, const uint16_t*, int64_t, float*);
using TileBf16Dot = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, float*);
using TileF32 = void (*)(const float*, int64_t, const float*, int64_t, float*);
using TileI8 = void (*)(const float*, int64_t, const int8_t*, int64_t, float*);
template <typename S>
using TileI4 = void (*)(const float*, int64_t, const float*, int64_t, const uint8_t*, int64_t, int64_t, const S*,
                        const S*, float*);
template <int MT, int NB>
struct Bf16F32x { static constexpr TileBf16F32x fn = tile_bf16_f32x<MT, NB>; };
template <int MT, int NB>
struct F32 { static constexpr TileF32 fn = tile_f32<MT, NB>; };
template <int MT, int NB>
struct I8 { static constexpr TileI8 fn = tile_i8<MT, NB>; };
template <typename S>
struct I4 {
  template <int MT, int NB>
  struct T { static constexpr TileI4<S> fn = tile_i4<MT, NB, S>; };
};
#if defined(__AVX512BF16__)
template <int MT, int NB>
struct Bf16Dot { static constexpr TileBf16Dot fn = tile_bf16_dot<MT, NB>; };
#endif

// acc (mt rows of nb * 16) (* scales) + bias -> out rows m0.., columns of blocks blk.. (only the N real columns):
// whole vectors where the row has them (simd.h: the same fp32 operations in the same order, bf16 rounded as
// f32_to_bf16), the columns past the last whole vector one by one
void write_tile(const float* acc, int mt, int nb, int64_t m0, int64_t blk, const float* bias, int64_t N, void* out,
                bool out_bf16, const float* scales = nullptr) {
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

#if defined(__AMX_BF16__)
// AMX: tmm0-3 the C tiles (2 row groups x 2 blocks), tmm4-5 the A tiles (16 rows of x, 32 bf16 of K each), tmm6-7
// the B tiles: 16 pairs of K x 16 outputs, 64 bytes a row. A `Tiles` source gives block b's B tile at pair p: the
// bf16 packing as it lies ([KP][16][2] of a block) or int8 codes widened into that layout
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kAhead = 4 * kAmxPairs;  // pairs prefetched ahead: the weight comes from memory

struct Bf16Tiles {  // read in place
  const uint16_t* w;  // the first block of the group
  int64_t bs;         // elements between two blocks
  void load(int, int64_t) {}
  const void* tile(int b, int64_t p) const { return w + b * bs + p * 2 * kBlock; }
  void prefetch(int b, int64_t p) const {
    for (int64_t line = 0; line < kAmxPairs; ++line) __builtin_prefetch(w + b * bs + (p + line) * 2 * kBlock);
  }
};

// Quantized blocks widened to bf16 pairs once per group of blocks, for every K (all the group's rows then read the
// buffer): `Widen::pair(b, p)` the 16 lanes (rows) of block b's pair p, even k in the low half
template <typename Widen>
struct WidenedTiles {
  Widen widen;
  std::vector<uint32_t>* buf;  // (2, KP, 16), the calling thread's
  int64_t KP;
  void load(int nb, int64_t blk) {
    buf->resize(2 * KP * kBlock + 16);
    for (int b = 0; b < nb; ++b)
      for (int64_t p = 0; p < KP; ++p) _mm512_storeu_si512(row(b, p), widen.pair(blk, b, p));
  }
  uint32_t* row(int b, int64_t p) const { return buf->data() + (b * KP + p) * kBlock; }
  const void* tile(int b, int64_t p) const { return row(b, p); }
  void prefetch(int, int64_t) const {}
};

struct Int8Widen {  // codes [K][16] a block: exact in bf16 (|code| <= 128), the fp32 bits' high halves
  const int8_t* w;
  int64_t bs;
  __m512i pair(int64_t blk, int b, int64_t p) const {
    const int8_t* src = w + (blk + b) * bs + 2 * p * kBlock;  // k = 2p: 16 codes, then k = 2p + 1's
    const __m512 even = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
    const __m512 odd = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + kBlock))));
    return _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(even), 16),
                           _mm512_and_si512(_mm512_castps_si512(odd), _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
};

// int4 codes [KP][16] a block with [G][16] scales / offsets: code * scale + offset in fp32 as dequant_i4_kn computes
// it, rounded once to bf16 (the weight the many-row route multiplies)
template <typename S>
struct Int4Widen {
  const uint8_t* w;
  const S *scales, *offsets;
  int64_t bs, ss, gp;  // bytes between blocks, scale entries between blocks, pairs per group
  __m512i pair(int64_t blk, int b, int64_t p) const {
    vf s, o, lo, hi;
    const int64_t g = p / gp, at = (blk + b) * ss + g * kBlock;
    vscale(scales + at, offsets + at, s, o);
    vnibbles(w + (blk + b) * bs + p * kBlock, lo, hi);
    // both rounded to nearest even in one conversion (words 0-15 the even k, 16-31 the odd), then interleaved
    const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(vfma(hi, s, o), vfma(lo, s, o)));
    return _mm512_permutexvar_epi16(kInterleave, both);
  }
  static inline const __m512i kInterleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                                             8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
};

template <int MT, int NB, typename Tiles>
void tile_amx(const uint16_t* x, int64_t xs, Tiles& tiles, int64_t KP, float* acc_out) {
  _tile_zero(0);
  if (NB > 1) _tile_zero(1);
  if (MT > 1) _tile_zero(2);
  if (MT > 1 && NB > 1) _tile_zero(3);
  for (int64_t p = 0; p < KP; p += kAmxPairs) {
    if (p + kAhead < KP)
      for (int b = 0; b < NB; ++b) tiles.prefetch(b, p + kAhead);
    _tile_loadd(6, tiles.tile(0, p), 64);
    if (NB > 1) _tile_loadd(7, tiles.tile(1, p), 64);
    _tile_loadd(4, x + 2 * p, xs * 2);
    if (MT > 1) _tile_loadd(5, x + 16 * xs + 2 * p, xs * 2);
    _tile_dpbf16ps(0, 4, 6);
    if (NB > 1) _tile_dpbf16ps(1, 4, 7);
    if (MT > 1) _tile_dpbf16ps(2, 5, 6);
    if (MT > 1 && NB > 1) _tile_dpbf16ps(3, 5, 7);
  }
  // acc rows of NB * 16: tile (r, b) at rows 16 r.., columns 16 b..
  const int64_t ld = NB * kBlock * 4;
  _tile_stored(0, acc_out, ld);
  if (NB > 1) _tile_stored(1, acc_out + kBlock, ld);
  if (MT > 1) _tile_stored(2, acc_out + 16 * NB * kBlock, ld);
  if (MT > 1 && NB > 1) _tile_stored(3, acc_out + 16 * NB * kBlock + kBlock, ld);
}

// blocks [b0, b1) two at a time, rows 32 at a time; `tiles_at(blk)` the B source of the blocks from blk
template <typename TilesAt>
void amx_blocks(const uint16_t* x, int64_t M, int64_t x_stride, int64_t KP, const TilesAt& tiles_at,
                const float* scales, const float* bias, int64_t N, int64_t b0, int64_t b1, void* out, bool out_bf16) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  alignas(64) float acc[2 * 16 * 2 * kBlock];
  for (int64_t blk = b0; blk < b1; blk += 2) {
    const int nb = static_cast<int>(std::min<int64_t>(2, b1 - blk));
    auto tiles = tiles_at(blk);
    tiles.load(nb, blk);
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
      const int mt = M - m0 > 16 ? 2 : 1;
      const uint16_t* xr = x + m0 * x_stride;
      if (mt == 2 && nb == 2) tile_amx<2, 2>(xr, x_stride, tiles, KP, acc);
      else if (mt == 2) tile_amx<2, 1>(xr, x_stride, tiles, KP, acc);
      else if (nb == 2) tile_amx<1, 2>(xr, x_stride, tiles, KP, acc);
      else tile_amx<1, 1>(xr, x_stride, tiles, KP, acc);
      write_tile(acc, static_cast<int>(std::min<int64_t>(16 * mt, M - m0)), nb, m0, blk, bias, N, out, out_bf16,
                 scales);
    }
  }
  _tile_release();
}
#endif

}  // namespace

bool amx_ready() {
#if defined(__AMX_BF16__)
  // Linux hands out the tile registers' state only to a process that asks (ARCH_REQ_XCOMP_PERM, XTILEDATA);
  // asked once, the answer kept
  static const bool ready = [] {
    constexpr long kReqPerm = 0x1023, kGetPerm = 0x1022, kXtiledata = 18;
    if (syscall(SYS_arch_prctl, kReqPerm, kXtiledata) != 0) return false;
    unsigned long features = 0;
    return syscall(SYS_arch_prctl, kGetPerm, &features) == 0 && (features & (1ul << kXtiledata)) != 0;
  }();
  return ready;
#else
  return false;
#endif
}

void gemm_bf16_amx_blocks(const uint16_t* x, int64_t M, int64_t x_stride, const uint16_t* w, int64_t KP,
                          const float* bias, int64_t N, int64_t b0, int64_t b1, void* out, bool out_bf16) {
#if defined(__AMX_BF16__)
  const int64_t bs = KP * 2 * kBlock;
  amx_blocks(x, M, x_stride, KP, [&](int64_t blk) { return Bf16Tiles{w + blk * bs, bs}; }, nullptr, bias, N, b0, b1,
             out, out_bf16);
#else
  (void)x, (void)M, (void)x_stride, (void)w, (void)KP, (void)bias, (void)N, (void)b0, (void)b1, (void)out,
      (void)out_bf16;
  std::abort();  // callers check amx_ready() first
#endif
}

void gemm_i8_amx_blocks(const uint16_t* x, int64_t M, int64_t x_stride, const int8_t* w, int64_t K,
                        const float* scales, const float* bias, int64_t N, int64_t b0, int64_t b1, void* out,
                        bool out_bf16) {
#if defined(__AMX_BF16__)
  thread_local std::vector<uint32_t> buf;
  const Int8Widen widen{w, K * kBlock};
  amx_blocks(x, M, x_stride, K / 2, [&](int64_t) { return WidenedTiles<Int8Widen>{widen, &buf, K / 2}; }, scales,
             bias, N, b0, b1, out, out_bf16);
#else
  (void)x, (void)M, (void)x_stride, (void)w, (void)K, (void)scales, (void)bias, (void)N, (void)b0, (void)b1,
      (void)out, (void)out_bf16;
  std::abort();  // callers check amx_ready() first
#endif
}

void gemm_i4_amx_blocks(const uint16_t* x, int64_t M, int64_t x_stride, const uint8_t* w, int64_t KP, int64_t G,
                        int64_t group_pairs, const void* scales, const void* offsets, bool bf16_scales,
                        const float* bias, int64_t N, int64_t b0, int64_t b1, void* out, bool out_bf16) {
#if defined(__AMX_BF16__)
  thread_local std::vector<uint32_t> buf;
  const int64_t bs = KP * kBlock, ss = G * kBlock;
  auto run = [&](auto widen) {
    using Widen = decltype(widen);
    amx_blocks(x, M, x_stride, KP, [&](int64_t) { return WidenedTiles<Widen>{widen, &buf, KP}; }, nullptr, bias, N,
               b0, b1, out, out_bf16);
  };
  if (bf16_scales)
    run(Int4Widen<uint16_t>{w, static_cast<const uint16_t*>(scales), static_cast<const uint16_t*>(offsets), bs, ss,
                            group_pairs});
  else
    run(Int4Widen<float>{w, static_cast<const float*>(scales), static_cast<const float*>(offsets), bs, ss,
                         group_pairs});
#else
  (void)x, (void)M, (void)x_stride, (void)w, (void)KP, (void)G, (void)group_pairs, (void)scales, (void)offsets,
      (void)bf16_scales, (void)bias, (void)N, (void)b0, (void)b1, (void)out, (void)out_bf16;
  std::abort();  // callers check amx_ready() first
#endif
}

bool has_bf16_dot() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

void gemv_bf16_blocks(const void* x, bool x_is_bf16, int64_t M, int64_t x_stride, const uint16_t* w, int64_t KP,
                      const float* bias, int64_t N, int64_t b0, int64_t b1, void* out, bool out_bf16) {
  alignas(64) float acc[MT_MAX * NB_MAX * kBlock];
  const int64_t bs = KP * 2 * kBlock;
  for (int64_t blk = b0; blk < b1; blk += NB_MAX) {
    const int nb = static_cast<int>(std::min<int64_t>(NB_MAX, b1 - blk));
    for (int64_t m0 = 0; m0 < M; m0 += MT_MAX) {
      const int mt = static_cast<int>(std::min<int64_t>(MT_MAX, M - m0));
#if defined(__AVX512BF16__)
      if (x_is_bf16) {
        const uint16_t* xb = static_cast<const uint16_t*>(x) + m0 * x_stride;
        pick<TileBf16Dot, Bf16Dot>(mt, nb)(xb, x_stride, w + blk * bs, KP, acc);
        write_tile(acc, mt, nb, m0, blk, bias, N, out, out_bf16);
        continue;
      }
#endif
      const float* xf = static_cast<const float*>(x) + m0 * x_stride;
      pick<TileBf16F32x, Bf16F32x>(mt, nb)(xf, x_stride, w + blk * bs, KP, acc);
      write_tile(acc, mt, nb, m0, blk, bias, N, out, out_bf16);
    }
  }
}

void gemv_f32_blocks(const float* x, int64_t M, int64_t x_stride, const float* w, int64_t K, const float* bias,
                     int64_t N, int64_t b0, int64_t b1, float* out) {
  alignas(64) float acc[MT_MAX * NB_MAX * kBlock];
  const int64_t bs = K * kBlock;
  for (int64_t blk = b0; blk < b1; blk += NB_MAX) {
    const int nb = static_cast<int>(std::min<int64_t>(NB_MAX, b1 - blk));
    for (int64_t m0 = 0; m0 < M; m0 += MT_MAX) {
      const int mt = static_cast<int>(std::min<int64_t>(MT_MAX, M - m0));
      pick<TileF32, F32>(mt, nb)(x + m0 * x_stride, x_stride, w + blk * bs, K, acc);
      write_tile(acc, mt, nb, m0, blk, bias, N, out, false);
    }
  }
}

void gemv_i8_blocks(const float* x, int64_t M, int64_t x_stride, const int8_t* w, int64_t K, const float* scales,
                    const float* bias, int64_t N, int64_t b0, int64_t b1, void* out, bool out_bf16) {
  alignas(64) float acc[MT_MAX * NB_MAX * kBlock];
  const int64_t bs = K * kBlock;
  for (int64_t blk = b0; blk < b1; blk += NB_MAX) {
    const int nb = static_cast<int>(std::min<int64_t>(NB_MAX, b1 - blk));
    for (int64_t m0 = 0; m0 < M; m0 += MT_MAX) {
      const int mt = static_cast<int>(std::min<int64_t>(MT_MAX, M - m0));
      pick<TileI8, I8>(mt, nb)(x + m0 * x_stride, x_stride, w + blk * bs, K, acc);
      write_tile(acc, mt, nb, m0, blk, bias, N, out, out_bf16, scales);
    }
  }
}

namespace {

template <typename S>
void i4_blocks(const float* x, int64_t M, int64_t x_stride, const float* xsum, int64_t G, const uint8_t* w, int64_t KP,
               int64_t group_pairs, const S* scales, const S* offsets, const float* bias, int64_t N, int64_t b0,
               int64_t b1, void* out, bool out_bf16) {
  constexpr int NB4 = 2;  // two blocks per tile: the per-group partial sums double the live accumulators
  alignas(64) float acc[MT_MAX * NB4 * kBlock];
  const int64_t bs = KP * kBlock, ss = G * kBlock;
  for (int64_t blk = b0; blk < b1; blk += NB4) {
    const int nb = static_cast<int>(std::min<int64_t>(NB4, b1 - blk));
    for (int64_t m0 = 0; m0 < M; m0 += MT_MAX) {
      const int mt = static_cast<int>(std::min<int64_t>(MT_MAX, M - m0));
      const TileI4<S> fn = nb == 1 ? pick_m<TileI4<S>, I4<S>::template T, 1>(mt)
                                   : pick_m<TileI4<S>, I4<S>::template T, NB4>(mt);
      fn(x + m0 * x_stride, x_stride, xsum + m0 * G, G, w + blk * bs, KP, group_pairs, scales + blk * ss,
         offsets + blk * ss, acc);
      write_tile(acc, mt, nb, m0, blk, bias, N, out, out_bf16);
    }
  }
}

}  // namespace

void gemv_i4_blocks(const float* x, int64_t M, int64_t x_stride, const float* xsum, int64_t G, const uint8_t* w,
                    int64_t KP, int64_t group_pairs, const void* scales, const void* offsets, bool bf16_scales,
                    const float* bias, int64_t N, int64_t b0, int64_t b1, void* out, bool out_bf16) {
  if (bf16_scales)
    i4_blocks(x, M, x_stride, xsum, G, w, KP, group_pairs, static_cast<const uint16_t*>(scales),
              static_cast<const uint16_t*>(offsets), bias, N, b0, b1, out, out_bf16);
  else
    i4_blocks(x, M, x_stride, xsum, G, w, KP, group_pairs, static_cast<const float*>(scales),
              static_cast<const float*>(offsets), bias, N, b0, b1, out, out_bf16);
}

void dequant_i4_blocks(const uint8_t* w, int64_t KP, int64_t G, int64_t group_pairs, const void* scales,
                       const void* offsets, bool bf16_scales, int64_t ld, int64_t b0, int64_t b1, void* out,
                       bool out_bf16) {
  if (bf16_scales)
    dequant_i4_kn(w, KP, G, group_pairs, static_cast<const uint16_t*>(scales), static_cast<const uint16_t*>(offsets),
                  ld, b0, b1, out, out_bf16);
  else
    dequant_i4_kn(w, KP, G, group_pairs, static_cast<const float*>(scales), static_cast<const float*>(offsets), ld,
                  b0, b1, out, out_bf16);
}

}  // namespace flab
