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

// Sequence s, KV head h: its Hq / Hkv query heads attend over the seq_len cached tokens (the new one included,
// already stored). q (S, Hq, D), caches (NB, BS, Hkv, D / Dv), table (S, max_blocks), out (S, Hq, Dv).
// sinks (Hq,) fp32 or null: an extra logit per head in the softmax denominator (no value).
template <typename T>
void paged_decode_head(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t seq_len,
                       int64_t kv_head, const float* sinks, const DecodeShape& shape, T* out);

}  // namespace flab
