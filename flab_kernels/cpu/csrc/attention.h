// Paged decode attention over the KV cache in place (no gather): one new token per sequence.
#pragma once

#include <cstdint>

namespace flab {

struct DecodeShape {
  int64_t num_q_heads, num_kv_heads, head_dim, v_head_dim, block_size, max_blocks;
  int64_t q_stride;  // elements between two sequences' queries (Hq * D when contiguous)
  float scale, softcap;  // softcap <= 0: none
  int64_t window;  // sliding window (keys at positions > len - 1 - window); <= 0: none
};

// the first position a sequence of seq_len tokens attends to (its sliding window)
inline int64_t window_begin(int64_t seq_len, const DecodeShape& sh) {
  return sh.window > 0 && seq_len > sh.window ? seq_len - sh.window : 0;
}

// Sequence s, KV head h: its Hq / Hkv query heads attend over the seq_len cached tokens (the new one included,
// already stored). q (S, Hq, D), caches (NB, BS, Hkv, D / Dv), table (S, max_blocks), out (S, Hq, Dv).
// sinks (Hq,) fp32 or null: an extra logit per head in the softmax denominator (no value).
template <typename T>
void paged_decode_head(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t seq_len,
                       int64_t kv_head, const float* sinks, const DecodeShape& shape, T* out);

// One chunk of a long context (a split across threads when there are fewer (sequence, KV head) items than
// threads): the softmax state over the tokens [t0, t1) of sequence / KV head, per head of the group: m (G) the
// running max, l (G) the sum of exp(score - m), acc (G, Dv) the unnormalized output
template <typename T>
void paged_decode_partial(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t t0,
                          int64_t t1, int64_t kv_head, const DecodeShape& shape, float* m, float* l, float* acc);

// The chunks' states (chunks x the above, chunk-major) merged and normalized into the group's output rows
template <typename T>
void paged_decode_merge(const float* m, const float* l, const float* acc, int64_t chunks, int64_t kv_head,
                        const float* sinks, const DecodeShape& shape, T* out);

}  // namespace flab
