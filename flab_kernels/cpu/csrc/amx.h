// Products on AMX tiles (amx.cpp) over gemv.h's packings, for many rows of bf16 x.
#pragma once

#include <cstdint>

#include "gemv.h"

namespace flab {

// AMX (variant amx, when amx_ready(): the OS lets this process use the tile registers): x (M, 2 * KP) bf16 rows
// that go on to a multiple of 16 rows (the tiles read whole groups of 16; those padding rows are not written out);
// KP a multiple of kAmxPairs. Blocks [b0, b1)
constexpr int64_t kAmxPairs = 16;  // K pairs per tile
bool amx_ready();
void gemm_bf16_amx_blocks(const uint16_t* x, int64_t M, int64_t x_stride, const uint16_t* w, int64_t KP,
                          const float* bias, int64_t N, int64_t b0, int64_t b1, void* out, bool out_bf16);
// int8 weights [NB][K][16] (gemv_i8_blocks' packing) on AMX: each pair of blocks' codes widened to bf16 pairs once
// (exact), x bf16 as above; K a multiple of 2 * kAmxPairs
void gemm_i8_amx_blocks(const uint16_t* x, int64_t M, int64_t x_stride, const int8_t* w, int64_t K,
                        const float* scales, const float* bias, int64_t N, int64_t b0, int64_t b1, void* out,
                        bool out_bf16);
// int4 group-wise weights (gemv_i4_blocks' packing) on AMX: each pair of blocks dequantized once as
// dequant_i4_blocks does, rounded once to bf16 (the weight the many-row route multiplies); x bf16 as above
void gemm_i4_amx_blocks(const uint16_t* x, int64_t M, int64_t x_stride, const uint8_t* w, int64_t KP, int64_t G,
                        int64_t group_pairs, const void* scales, const void* offsets, bool bf16_scales,
                        const float* bias, int64_t N, int64_t b0, int64_t b1, void* out, bool out_bf16);

}  // namespace flab
