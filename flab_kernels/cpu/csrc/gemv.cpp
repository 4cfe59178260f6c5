// GEMV / small-M GEMM over prepacked weights (layouts in gemv.h), one variant per instruction set.
//
// A tile is MT input rows x NB packed blocks (NB * 16 outputs): each weight vector is loaded once and used for
// MT rows, and NB independent accumulator chains hide the FMA latency while NB weight streams are in flight.
#include "gemv.h"

#include <algorithm>

#include "packed.h"

namespace flab {

namespace {

using namespace packed;

#if defined(__AVX512F__)
constexpr int MT_MAX = 4, NB_MAX = 4;
#else
constexpr int MT_MAX = 1, NB_MAX = 2;  // 16 ymm registers
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


}  // namespace

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
