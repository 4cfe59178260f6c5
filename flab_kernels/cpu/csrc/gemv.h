// Weight GEMV / small-M GEMM over prepacked weights (raw pointers; threading in the caller's loop over blocks).
//
// Packed layouts (flab_kernels/cpu/ops.py packs them once at load):
//   bf16: [NB][KP][16][2]  16 output rows per block, K in pairs (k even, k odd) next to each other, zero padded
//   fp32: [NB][K][16]
//   int8: [NB][K][16]  (weight-only: out = (sum_k x * q) * scale[n])
//   int4: [NB][K/2][16] bytes of two codes, with [NB][G][16] scales and offsets per group (fp32 or bf16)
// out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), fp32 accumulation, written in the output dtype.
#pragma once

#include <cstdint>

namespace flab {

constexpr int kBlock = 16;  // output rows per packed block

// x: (M, 2*KP) bf16 rows (stride x_stride elements) on CPUs with AVX512-BF16, else fp32 rows; blocks [b0, b1)
void gemv_bf16_blocks(const void* x, bool x_is_bf16, int64_t M, int64_t x_stride, const uint16_t* w, int64_t KP,
                      const float* bias, int64_t N, int64_t b0, int64_t b1, void* out, bool out_bf16);

// x: (M, K) fp32 rows; blocks [b0, b1)
void gemv_f32_blocks(const float* x, int64_t M, int64_t x_stride, const float* w, int64_t K, const float* bias,
                     int64_t N, int64_t b0, int64_t b1, float* out);

// int8 weights [NB][K][16] (weight-only, per-output-row fp32 scales), x: (M, K) fp32 rows; blocks [b0, b1)
void gemv_i8_blocks(const float* x, int64_t M, int64_t x_stride, const int8_t* w, int64_t K, const float* scales,
                    const float* bias, int64_t N, int64_t b0, int64_t b1, void* out, bool out_bf16);

// int4 group-wise weight-only: w [NB][KP][16] uint8, byte j of pair p = row j's codes (0..15) for k = 2p (low
// nibble) and 2p + 1 (high); scales, offsets [NB][G][16] either fp32 (w = code * scale + offset) or, with
// bf16_scales, bf16 as torch's cpu_int4pack keeps them (w = (code - 8) * scale + offset: the kernel adds the code
// bias as offset - 8 * scale in fp32, exactly the fp32 offsets the fp32 packing would hold); group_pairs = group / 2.
// gemv_i4_blocks (few rows): x (M, 2 * KP) fp32 rows, xsum (M, G) the sums of x over each group; per group the
// sums of x times the raw codes, times the scale, plus the offset times xsum. Blocks [b0, b1).
void gemv_i4_blocks(const float* x, int64_t M, int64_t x_stride, const float* xsum, int64_t G, const uint8_t* w,
                    int64_t KP, int64_t group_pairs, const void* scales, const void* offsets, bool bf16_scales,
                    const float* bias, int64_t N, int64_t b0, int64_t b1, void* out, bool out_bf16);

// int4 blocks [b0, b1) dequantized (code * scale + offset in fp32, the scales as in gemv_i4_blocks) into W^T:
// out (2 * KP, ld) row-major, out[k, b * 16 + j] = w[b * 16 + j, k], fp32 or rounded once to bf16 (out_bf16)
void dequant_i4_blocks(const uint8_t* w, int64_t KP, int64_t G, int64_t group_pairs, const void* scales,
                       const void* offsets, bool bf16_scales, int64_t ld, int64_t b0, int64_t b1, void* out,
                       bool out_bf16);

bool has_bf16_dot();  // this variant multiplies bf16 pairs natively (x stays bf16)

}  // namespace flab
