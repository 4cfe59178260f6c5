// AMX tiles (amx.h) over the packed weights: the bf16 packing read in place as B tiles, int8 / int4 codes widened to
// bf16 pairs once per pair of blocks. Built in the `amx` variant only; elsewhere amx_ready() is false and the
// entry points are never called.
#include "amx.h"

#include <algorithm>
#include <cstdlib>
#include <vector>

#if defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "packed.h"

namespace flab {

namespace {

#if defined(__AMX_BF16__)
using namespace packed;

// AMX: tmm0-3 the C tiles (2 row groups x 2 blocks), tmm4-5 the A tiles (16 rows of x, 32 bf16 of K each), tmm6-7
// the B tiles: 16 pairs of K x 16 outputs, 64 bytes a row. A `Tiles` source, `load`ed with a group of (up to two)
// blocks, gives block b's B tile at pair p: the bf16 packing as it lies ([KP][16][2] of a block) or int8 / int4
// codes widened into that layout
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kAhead = 4 * kAmxPairs;  // pairs prefetched ahead: the weight comes from memory

struct Bf16Tiles {  // read in place
  const uint16_t* w;
  int64_t bs;                   // elements between two blocks
  const uint16_t* at = nullptr;  // the first block of the group
  void load(int, int64_t blk) { at = w + blk * bs; }
  const void* tile(int b, int64_t p) const { return at + b * bs + p * 2 * kBlock; }
  void prefetch(int b, int64_t p) const {
    for (int64_t line = 0; line < kAmxPairs; ++line) __builtin_prefetch(at + b * bs + (p + line) * 2 * kBlock);
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
    buf->resize(2 * KP * kBlock);
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

// blocks [b0, b1) two at a time (each pair `load`ed into `tiles`), rows 32 at a time
template <typename Tiles>
void amx_blocks(const uint16_t* x, int64_t M, int64_t x_stride, int64_t KP, Tiles tiles, const float* scales,
                const float* bias, int64_t N, int64_t b0, int64_t b1, void* out, bool out_bf16) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  alignas(64) float acc[2 * 16 * 2 * kBlock];
  for (int64_t blk = b0; blk < b1; blk += 2) {
    const int nb = static_cast<int>(std::min<int64_t>(2, b1 - blk));
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
  amx_blocks(x, M, x_stride, KP, Bf16Tiles{w, KP * 2 * kBlock}, nullptr, bias, N, b0, b1, out, out_bf16);
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
  const WidenedTiles<Int8Widen> tiles{Int8Widen{w, K * kBlock}, &buf, K / 2};
  amx_blocks(x, M, x_stride, K / 2, tiles, scales, bias, N, b0, b1, out, out_bf16);
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
    const WidenedTiles<decltype(widen)> tiles{widen, &buf, KP};
    amx_blocks(x, M, x_stride, KP, tiles, nullptr, bias, N, b0, b1, out, out_bf16);
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

}  // namespace flab
