// Paged decode attention (attention.h): one pass over the cache blocks with an online softmax in fp32. Per block:
// the scores of its tokens for the whole query-head group (each K row read once: bf16 pairs multiplied as they are
// where the CPU has AVX512-BF16, else converted to fp32 once for every head; one multiply-add chain and one
// horizontal sum per head, times the scale), the block's probabilities by the vector exp, then each V row read
// once (converted once) into every head's accumulator.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "vec.h"

namespace flab {

namespace {

using namespace simd;

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = f32_to_bf16(v); }

// sum_i q[i] * k[i] over d fp32 values
inline float dot(const float* q, const float* k, int64_t d) {
  vf acc = vset(0.0f);
  int64_t i = 0;
  for (; i + L <= d; i += L) acc = vfma(vload(q + i), vload(k + i), acc);
  float s = vsum(acc);
  for (; i < d; ++i) s += q[i] * k[i];
  return s;
}

// a cache row as fp32: itself (fp32) or converted once into `row` (bf16), for every head of the group to read
inline const float* as_f32(const float* p, int64_t, float*) { return p; }
inline const float* as_f32(const uint16_t* p, int64_t d, float* row) {
  int64_t i = 0;
  for (; i + L <= d; i += L) vstore(row + i, vload(p + i));
  for (; i < d; ++i) row[i] = bf16_to_f32(p[i]);
  return row;
}

#if defined(__AVX512BF16__)
// bf16 q . bf16 k over d values (d % 32 == 0): products of bf16 pairs summed in fp32 (vdpbf16ps)
inline float dot_bf16(const uint16_t* q, const uint16_t* k, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + i), (__m512bh)_mm512_loadu_si512(k + i));
  return _mm512_reduce_add_ps(acc);
}
#endif

// acc[i] += p * v[i]: one V row into one head's accumulator
inline void axpy(float p, const float* v, float* acc, int64_t d) {
  const vf pv = vset(p);
  int64_t i = 0;
  for (; i + L <= d; i += L) vstore(acc + i, vfma(pv, vload(v + i), vload(acc + i)));
  for (; i < d; ++i) acc[i] += p * v[i];
}

inline void scale_row(float* a, float r, int64_t d) {
  const vf rv = vset(r);
  int64_t i = 0;
  for (; i + L <= d; i += L) vstore(a + i, vmul(vload(a + i), rv));
  for (; i < d; ++i) a[i] *= r;
}

// p[j] = exp(s[j] - m) for j in [0, n), n <= block size; returns their sum
inline float exp_row(float* s, int64_t n, float m) {
  float total = 0.0f;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const vf p = vexp(vadd(vload(s + j), vset(-m)));
    vstore(s + j, p);
    total += vsum(p);
  }
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    total += s[j];
  }
  return total;
}

}  // namespace

namespace {

// HD > 0: head_dim == v_head_dim == HD known at compile time (the row loops unrolled); 0: read from the shape
template <typename T, int64_t HD>
void decode_head(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t seq_len,
                 int64_t kv_head, const float* sinks, const DecodeShape& sh, T* out) {
  const int64_t G = sh.num_q_heads / sh.num_kv_heads, BS = sh.block_size;
  const int64_t D = HD > 0 ? HD : sh.head_dim, DV = HD > 0 ? HD : sh.v_head_dim;
  const int64_t first_head = kv_head * G;
  const int64_t begin = sh.window > 0 ? std::max<int64_t>(0, seq_len - sh.window) : 0;
  // qf (G, D) | acc (G, DV) | scores (G, BS) | running max m (G) | running sum l (G) | one K or V row as fp32
  thread_local std::vector<float> buf;
  buf.resize(G * (D + DV + BS + 2) + std::max(D, DV));
  float* qf = buf.data();
  float* acc = qf + G * D;
  float* scores = acc + G * DV;
  float* m = scores + G * BS;
  float* l = m + G;
  float* row = l + G;
  std::fill(acc, acc + G * DV, 0.0f);
  for (int64_t g = 0; g < G; ++g) {
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.0f;
    for (int64_t i = 0; i < D; ++i) qf[g * D + i] = to_f32(q[(first_head + g) * D + i]);
  }
#if defined(__AVX512BF16__)
  constexpr bool bf16_cache = std::is_same_v<T, uint16_t>;
  const bool pairs = bf16_cache && D % 32 == 0;  // K products as bf16 pairs, q read as it is
#else
  const bool pairs = false;
#endif
  const int64_t k_row = sh.num_kv_heads * D, v_row = sh.num_kv_heads * DV;  // elements between two tokens
  for (int64_t b = begin / BS; b * BS < seq_len; ++b) {
    const int64_t block = table[b];
    const int64_t lo = std::max(begin, b * BS) - b * BS, hi = std::min(seq_len, (b + 1) * BS) - b * BS, n = hi - lo;
    const T* kb = k_cache + block * BS * k_row + kv_head * D;
    const T* vb = v_cache + block * BS * v_row + kv_head * DV;
    for (int64_t j = lo; j < hi; ++j) {
      const T* k = kb + j * k_row;
      const float* kf = pairs ? nullptr : as_f32(k, D, row);
      for (int64_t g = 0; g < G; ++g) {
#if defined(__AVX512BF16__)
        float s = (pairs ? dot_bf16(reinterpret_cast<const uint16_t*>(q) + (first_head + g) * D,
                                    reinterpret_cast<const uint16_t*>(k), D)
                         : dot(qf + g * D, kf, D)) * sh.scale;
#else
        float s = dot(qf + g * D, kf, D) * sh.scale;
#endif
        if (sh.softcap > 0.0f) s = std::tanh(s / sh.softcap) * sh.softcap;
        scores[g * BS + j - lo] = s;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float* s = scores + g * BS;
      float block_max = m[g];
      for (int64_t j = 0; j < n; ++j) block_max = std::max(block_max, s[j]);
      const float rescale = std::exp(m[g] - block_max);  // 0 on the first block (m = -inf)
      if (rescale != 1.0f) scale_row(acc + g * DV, rescale, DV);
      l[g] = l[g] * rescale + exp_row(s, n, block_max);
      m[g] = block_max;
    }
    for (int64_t j = 0; j < n; ++j) {
      const float* v = as_f32(vb + (lo + j) * v_row, DV, row);
      for (int64_t g = 0; g < G; ++g) axpy(scores[g * BS + j], v, acc + g * DV, DV);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float r = 1.0f / l[g];
    if (sinks != nullptr) {  // the sink's logit joins the softmax: rescale to its max with the sink
      const float sink = sinks[first_head + g];
      const float mx = std::max(m[g], sink);
      r = std::exp(m[g] - mx) / (l[g] * std::exp(m[g] - mx) + std::exp(sink - mx));
    }
    for (int64_t i = 0; i < DV; ++i) store(out + (first_head + g) * DV + i, acc[g * DV + i] * r);
  }
}

}  // namespace

template <typename T>
void paged_decode_head(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t seq_len,
                       int64_t kv_head, const float* sinks, const DecodeShape& sh, T* out) {
  const bool same = sh.head_dim == sh.v_head_dim;
  if (same && sh.head_dim == 64)
    decode_head<T, 64>(q, k_cache, v_cache, table, seq_len, kv_head, sinks, sh, out);
  else if (same && sh.head_dim == 128)
    decode_head<T, 128>(q, k_cache, v_cache, table, seq_len, kv_head, sinks, sh, out);
  else
    decode_head<T, 0>(q, k_cache, v_cache, table, seq_len, kv_head, sinks, sh, out);
}

template void paged_decode_head<float>(const float*, const float*, const float*, const int32_t*, int64_t, int64_t,
                                       const float*, const DecodeShape&, float*);
template void paged_decode_head<uint16_t>(const uint16_t*, const uint16_t*, const uint16_t*, const int32_t*, int64_t,
                                          int64_t, const float*, const DecodeShape&, uint16_t*);

}  // namespace flab
