// Paged decode attention (attention.h): one pass over the cache blocks with an online softmax in fp32; each
// block's scores for the whole query-head group first (one read of the K rows), then its values.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

namespace flab {

namespace {

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = f32_to_bf16(v); }

template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += q[i] * to_f32(k[i]);
  return s;
}

template <typename T>
inline void axpy(float a, const T* v, float* acc, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) acc[i] += a * to_f32(v[i]);
}

}  // namespace

template <typename T>
void paged_decode_head(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t seq_len,
                       int64_t kv_head, const float* sinks, const DecodeShape& sh, T* out) {
  const int64_t G = sh.num_q_heads / sh.num_kv_heads, D = sh.head_dim, DV = sh.v_head_dim, BS = sh.block_size;
  const int64_t first_head = kv_head * G;
  const int64_t begin = sh.window > 0 ? std::max<int64_t>(0, seq_len - sh.window) : 0;
  std::vector<float> qf(G * D), acc(G * DV, 0.0f), scores(G * BS);
  std::vector<float> m(G, -std::numeric_limits<float>::infinity()), l(G, 0.0f);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i) qf[g * D + i] = to_f32(q[(first_head + g) * D + i]) * sh.scale;
  const int64_t k_row = sh.num_kv_heads * D, v_row = sh.num_kv_heads * DV;  // elements between two tokens
  for (int64_t b = begin / BS; b * BS < seq_len; ++b) {
    const int64_t block = table[b];
    const int64_t lo = std::max(begin, b * BS) - b * BS, hi = std::min(seq_len, (b + 1) * BS) - b * BS;
    const T* kb = k_cache + block * BS * k_row + kv_head * D;
    const T* vb = v_cache + block * BS * v_row + kv_head * DV;
    for (int64_t j = lo; j < hi; ++j) {
      for (int64_t g = 0; g < G; ++g) {
        float s = dot(qf.data() + g * D, kb + j * k_row, D);
        if (sh.softcap > 0.0f) s = std::tanh(s / sh.softcap) * sh.softcap;
        scores[g * BS + j] = s;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float block_max = m[g];
      for (int64_t j = lo; j < hi; ++j) block_max = std::max(block_max, scores[g * BS + j]);
      const float rescale = std::exp(m[g] - block_max);  // 0 on the first block (m = -inf)
      float* a = acc.data() + g * DV;
      if (rescale != 1.0f)
        for (int64_t i = 0; i < DV; ++i) a[i] *= rescale;
      l[g] *= rescale;
      m[g] = block_max;
      for (int64_t j = lo; j < hi; ++j) {
        const float p = std::exp(scores[g * BS + j] - block_max);
        l[g] += p;
        axpy(p, vb + j * v_row, a, DV);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float denom = l[g];
    if (sinks != nullptr) {  // the sink's logit joins the softmax: rescale to its max with the sink
      const float sink = sinks[first_head + g];
      const float mx = std::max(m[g], sink);
      denom = l[g] * std::exp(m[g] - mx) + std::exp(sink - mx);
      const float r = std::exp(m[g] - mx) / denom;
      for (int64_t i = 0; i < DV; ++i) store(out + (first_head + g) * DV + i, acc[g * DV + i] * r);
      continue;
    }
    const float inv = 1.0f / denom;
    for (int64_t i = 0; i < DV; ++i) store(out + (first_head + g) * DV + i, acc[g * DV + i] * inv);
  }
}

template void paged_decode_head<float>(const float*, const float*, const float*, const int32_t*, int64_t, int64_t,
                                       const float*, const DecodeShape&, float*);
template void paged_decode_head<uint16_t>(const uint16_t*, const uint16_t*, const uint16_t*, const int32_t*, int64_t,
                                          int64_t, const float*, const DecodeShape&, uint16_t*);

}  // namespace flab
