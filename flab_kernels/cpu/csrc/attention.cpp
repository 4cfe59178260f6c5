// Paged decode attention (attention.h): one pass over the cache blocks with an online softmax in fp32. Per block:
// the scores of its tokens for the whole query-head group (each K row read once: bf16 pairs multiplied as they are
// where the CPU has AVX512-BF16, else converted to fp32 once for every head; one multiply-add chain and one
// horizontal sum per head, times the scale), the block's probabilities by the vector exp, then each V row read
// once (converted once) into every head's accumulator.
#include "attention.h"

#include <algorithm>
#include <cstring>
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
// r[i] holds row i (16 x 32-bit); afterwards r[i] holds column i
inline void transpose16x16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + 4 + i], 0x88);
      t[h + 4 + i] = _mm512_shuffle_f32x4(r[h + i], r[h + 4 + i], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
  }
}

// scores[g * BS + t] = scale * (q_g . k_t) for the n <= 16 tokens t of k (rows k_row apart) and the G heads of q
// (rows D apart; D % 32 == 0), bf16: 32 columns of the 16 K rows are loaded and transposed (16 x 16 pairs), so the
// tokens are the 16 lanes of each pair's vector, multiplied with every head's broadcast q pair (vdpbf16ps:
// products of bf16 pairs summed in fp32): no horizontal sums
inline void score_tokens_bf16(const uint16_t* q, int64_t G, int64_t D, const uint16_t* k, int64_t k_row, int64_t n,
                              float scale, float* scores, int64_t BS) {
  const __mmask16 mask = n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
  constexpr int64_t GC = 8;  // heads per pass (accumulators in registers)
  for (int64_t g0 = 0; g0 < G; g0 += GC) {
    const int64_t gc = std::min(GC, G - g0);
    __m512 acc[GC];
    for (int64_t g = 0; g < GC; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < D; c += 32) {
      __m512 r[16];
      for (int64_t t = 0; t < 16; ++t)
        r[t] = t < n ? _mm512_castsi512_ps(_mm512_loadu_si512(k + t * k_row + c)) : _mm512_setzero_ps();
      transpose16x16(r);  // r[p]: pair c / 2 + p of the 16 tokens
      for (int64_t p = 0; p < 16; ++p)
        for (int64_t g = 0; g < GC; ++g) {
          if (g >= gc) break;
          int32_t pair;
          std::memcpy(&pair, q + (g0 + g) * D + c + 2 * p, 4);
          acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)r[p], (__m512bh)_mm512_set1_epi32(pair));
        }
    }
    for (int64_t g = 0; g < gc; ++g)
      _mm512_mask_storeu_ps(scores + (g0 + g) * BS, mask, _mm512_mul_ps(acc[g], _mm512_set1_ps(scale)));
  }
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

// max of s[0, n): whole vectors, one horizontal max, the tail one by one (no chain of n dependent scalar maxes)
inline float vmax_row(const float* s, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  if (n >= L) {
    vf v = vload(s);
    for (j = L; j + L <= n; j += L) v = vmax(v, vload(s + j));
    best = vhmax(v);
  }
  for (; j < n; ++j) best = std::max(best, s[j]);
  return best;
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

// acc[g] += sum_j p[g * BS + j] * v_j for the n tokens of a block (rows v_row apart) and the G heads, HD values per
// row: the accumulators of up to GC heads stay in registers over the block, each V row is loaded (converted) once
// per GC heads
template <int64_t HD, typename T>
inline void pv_block(const T* vb, int64_t v_row, int64_t n, const float* p, int64_t BS, int64_t G, float* acc) {
  constexpr int64_t NV = HD / L, GC = NV >= 16 ? 1 : 16 / NV;
  for (int64_t g0 = 0; g0 < G; g0 += GC) {
    const int64_t gc = std::min(GC, G - g0);
    vf a[GC][NV];
    for (int64_t g = 0; g < GC; ++g)
      for (int64_t i = 0; i < NV; ++i) a[g][i] = g < gc ? vload(acc + (g0 + g) * HD + i * L) : vset(0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const T* v = vb + j * v_row;
      vf vv[NV];
      for (int64_t i = 0; i < NV; ++i) vv[i] = vload(v + i * L);
      for (int64_t g = 0; g < GC; ++g) {
        if (g >= gc) break;
        const vf pv = vset(p[(g0 + g) * BS + j]);
        for (int64_t i = 0; i < NV; ++i) a[g][i] = vfma(pv, vv[i], a[g][i]);
      }
    }
    for (int64_t g = 0; g < gc; ++g)
      for (int64_t i = 0; i < NV; ++i) vstore(acc + (g0 + g) * HD + i * L, a[g][i]);
  }
}

// Ask for the n rows (`row` elements apart, `bytes` each) of one head of a cache block: the blocks of a sequence lie
// anywhere in the cache, so the hardware prefetchers cannot run ahead of a block boundary
template <typename T>
inline void prefetch_rows(const T* first, int64_t row, int64_t n, int64_t bytes) {
  for (int64_t j = 0; j < n; ++j) {
    const char* p = reinterpret_cast<const char*>(first + j * row);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
  }
}

// The online-softmax state of one (sequence, KV head) over the tokens [t0, t1) of its sequence, per head of the
// group: running max m (G), running sum l (G), unnormalized output acc (G, DV). HD > 0: head_dim == v_head_dim ==
// HD known at compile time (the row loops unrolled); 0: read from the shape.
template <typename T, int64_t HD>
void decode_range(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t t0, int64_t t1,
                  int64_t kv_head, const DecodeShape& sh, float* m, float* l, float* acc) {
  const int64_t G = sh.num_q_heads / sh.num_kv_heads, BS = sh.block_size;
  const int64_t D = HD > 0 ? HD : sh.head_dim, DV = HD > 0 ? HD : sh.v_head_dim;
  const int64_t first_head = kv_head * G;
  // qf (G, D) | scores (G, BS) | one K or V row as fp32: reused across calls
  thread_local std::vector<float> buf;
  buf.resize(G * (D + BS) + std::max(D, DV));
  float* qf = buf.data();
  float* scores = qf + G * D;
  float* row = scores + G * BS;
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
  for (int64_t b = t0 / BS; b * BS < t1; ++b) {
    const int64_t block = table[b];
    const int64_t lo = std::max(t0, b * BS) - b * BS, hi = std::min(t1, (b + 1) * BS) - b * BS, n = hi - lo;
    const T* kb = k_cache + block * BS * k_row + kv_head * D;
    const T* vb = v_cache + block * BS * v_row + kv_head * DV;
    if (b == t0 / BS) prefetch_rows(vb + lo * v_row, v_row, n, DV * sizeof(T));  // K: read at once
    if ((b + 1) * BS < t1) {  // the next block's rows arrive while this one is computed
      const int64_t next = table[b + 1], nn = std::min(t1 - (b + 1) * BS, BS);
      prefetch_rows(k_cache + next * BS * k_row + kv_head * D, k_row, nn, D * sizeof(T));
      prefetch_rows(v_cache + next * BS * v_row + kv_head * DV, v_row, nn, DV * sizeof(T));
    }
#if defined(__AVX512BF16__)
    if (pairs) {
      for (int64_t j = lo; j < hi; j += 16)
        score_tokens_bf16(reinterpret_cast<const uint16_t*>(q) + first_head * D, G, D,
                          reinterpret_cast<const uint16_t*>(kb + j * k_row), k_row, std::min<int64_t>(16, hi - j),
                          sh.scale, scores + j - lo, BS);
      if (sh.softcap > 0.0f)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t j = 0; j < n; ++j)
            scores[g * BS + j] = std::tanh(scores[g * BS + j] / sh.softcap) * sh.softcap;
    } else
#endif
    {
      for (int64_t j = lo; j < hi; ++j) {
        const float* kf = as_f32(kb + j * k_row, D, row);
        for (int64_t g = 0; g < G; ++g) {
          float s = dot(qf + g * D, kf, D) * sh.scale;
          if (sh.softcap > 0.0f) s = std::tanh(s / sh.softcap) * sh.softcap;
          scores[g * BS + j - lo] = s;
        }
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float* s = scores + g * BS;
      const float block_max = std::max(m[g], vmax_row(s, n));
      const float rescale = std::exp(m[g] - block_max);  // 0 on the first block (m = -inf)
      if (rescale != 1.0f) scale_row(acc + g * DV, rescale, DV);
      l[g] = l[g] * rescale + exp_row(s, n, block_max);
      m[g] = block_max;
    }
    if constexpr (HD > 0 && HD % L == 0) {
      pv_block<HD>(vb + lo * v_row, v_row, n, scores, BS, G, acc);
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const float* v = as_f32(vb + (lo + j) * v_row, DV, row);
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * BS + j], v, acc + g * DV, DV);
      }
    }
  }
}

// out rows of the group's heads: acc / l, the sink's logit joining the softmax when there are sinks
template <typename T>
void finalize(const float* m, const float* l, const float* acc, int64_t first_head, int64_t G, int64_t DV,
              const float* sinks, T* out) {
  for (int64_t g = 0; g < G; ++g) {
    float r = 1.0f / l[g];
    if (sinks != nullptr) {  // rescale to the max with the sink
      const float sink = sinks[first_head + g];
      const float mx = std::max(m[g], sink);
      r = std::exp(m[g] - mx) / (l[g] * std::exp(m[g] - mx) + std::exp(sink - mx));
    }
    for (int64_t i = 0; i < DV; ++i) store(out + (first_head + g) * DV + i, acc[g * DV + i] * r);
  }
}

}  // namespace

template <typename T>
void paged_decode_partial(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t t0,
                          int64_t t1, int64_t kv_head, const DecodeShape& sh, float* m, float* l, float* acc) {
  const bool same = sh.head_dim == sh.v_head_dim;
  if (same && sh.head_dim == 64)
    decode_range<T, 64>(q, k_cache, v_cache, table, t0, t1, kv_head, sh, m, l, acc);
  else if (same && sh.head_dim == 128)
    decode_range<T, 128>(q, k_cache, v_cache, table, t0, t1, kv_head, sh, m, l, acc);
  else
    decode_range<T, 0>(q, k_cache, v_cache, table, t0, t1, kv_head, sh, m, l, acc);
}

template <typename T>
void paged_decode_head(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t seq_len,
                       int64_t kv_head, const float* sinks, const DecodeShape& sh, T* out) {
  const int64_t G = sh.num_q_heads / sh.num_kv_heads, DV = sh.v_head_dim;
  thread_local std::vector<float> state;  // m (G) | l (G) | acc (G, DV)
  state.resize(G * (2 + DV));
  float *m = state.data(), *l = m + G, *acc = l + G;
  paged_decode_partial(q, k_cache, v_cache, table, window_begin(seq_len, sh), seq_len, kv_head, sh, m, l, acc);
  finalize(m, l, acc, kv_head * G, G, DV, sinks, out);
}

template <typename T>
void paged_decode_merge(const float* m, const float* l, const float* acc, int64_t chunks, int64_t kv_head,
                        const float* sinks, const DecodeShape& sh, T* out) {
  const int64_t G = sh.num_q_heads / sh.num_kv_heads, DV = sh.v_head_dim;
  std::vector<float> state(G * (2 + DV), 0.0f);  // m (G) | l (G) | acc (G, DV) of the whole range
  float *mm = state.data(), *ll = mm + G, *aa = ll + G;
  for (int64_t g = 0; g < G; ++g) {
    mm[g] = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < chunks; ++c) mm[g] = std::max(mm[g], m[c * G + g]);
    for (int64_t c = 0; c < chunks; ++c) {
      if (l[c * G + g] == 0.0f) continue;  // an empty chunk (m = -inf)
      const float w = std::exp(m[c * G + g] - mm[g]);
      ll[g] += l[c * G + g] * w;
      for (int64_t i = 0; i < DV; ++i) aa[g * DV + i] += acc[(c * G + g) * DV + i] * w;
    }
  }
  finalize(mm, ll, aa, kv_head * G, G, DV, sinks, out);
}

template void paged_decode_head<float>(const float*, const float*, const float*, const int32_t*, int64_t, int64_t,
                                       const float*, const DecodeShape&, float*);
template void paged_decode_head<uint16_t>(const uint16_t*, const uint16_t*, const uint16_t*, const int32_t*, int64_t,
                                          int64_t, const float*, const DecodeShape&, uint16_t*);
template void paged_decode_partial<float>(const float*, const float*, const float*, const int32_t*, int64_t, int64_t,
                                          int64_t, const DecodeShape&, float*, float*, float*);
template void paged_decode_partial<uint16_t>(const uint16_t*, const uint16_t*, const uint16_t*, const int32_t*,
                                             int64_t, int64_t, int64_t, const DecodeShape&, float*, float*, float*);
template void paged_decode_merge<float>(const float*, const float*, const float*, int64_t, int64_t, const float*,
                                        const DecodeShape&, float*);
template void paged_decode_merge<uint16_t>(const float*, const float*, const float*, int64_t, int64_t, const float*,
                                           const DecodeShape&, uint16_t*);

}  // namespace flab
