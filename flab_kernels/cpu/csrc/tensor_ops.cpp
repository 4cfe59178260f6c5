// The kernels on tensors: checks, padding, threading (at::parallel_for or claimed chunks over disjoint output blocks
// or rows). The Python bindings (bindings.cpp) and the decode stack (decode_stack.cpp) both call these.
#include "tensor_ops.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <utility>

#include "amx.h"
#include "attention.h"
#include "claim.h"
#include "gemv.h"
#include "norm_act.h"
#include "vec.h"

namespace {

constexpr int64_t kSerialWork = 1 << 15;  // below this many multiply-adds one thread does the whole product
// element-wise kernels (norms, activations, rotary) stay on one thread below this many elements: a parallel
// region costs more than it saves there, and on a loaded machine its barrier waits for a descheduled thread
// (measured: SiLU-and-mul of 4 x 1536 took 575 us on 2 threads against 6.5 us on one, load average 10)
constexpr int64_t kSerialElements = 1 << 17;
// decode attention splits a context across threads only in chunks of at least this many tokens
constexpr int64_t kMinChunk = 256;

// threads get contiguous ranges of [0, n) items (disjoint outputs); small work stays on the calling thread
template <typename F>
void parallel(int64_t n, int64_t work, const F& f) {
  const int64_t threads = work < kSerialWork ? 1 : at::get_num_threads();
  const int64_t grain = std::max<int64_t>(1, (n + threads - 1) / threads);
  at::parallel_for(0, n, grain, f);
}

// the product kernels: chunks of [0, n) (whole tiles of `align` items) claimed by this thread and helpers (claim.h),
// so a helper that another process keeps off its core costs nothing but the chunk it may hold
template <typename F>
void claim_parallel(int64_t n, int64_t work, int64_t align, const F& f) {
  const int threads = work < kSerialWork ? 1 : at::get_num_threads();
  if (threads <= 1 || n <= align) {
    f(0, n);
    return;
  }
  const int64_t chunks = std::min<int64_t>((n + align - 1) / align, 8 * threads);
  const int64_t per = ((n + chunks - 1) / chunks + align - 1) / align * align;
  flab::claim_run((n + per - 1) / per, threads, [&](int64_t c) { f(c * per, std::min(n, (c + 1) * per)); });
}

template <typename T>
T* ptr(const torch::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

}  // namespace

namespace flab {

namespace {

// AMX usable and a packing whose K (pairs) fills whole tiles: bf16 [NB][KP][16][2], int8 [NB][K][16], int4
// [NB][KP][16] bytes
bool amx_packing(const torch::Tensor& packed) {
  const auto type = packed.scalar_type();
  const bool bf16 = type == at::kBFloat16 && packed.dim() == 4, int8 = type == at::kChar && packed.dim() == 3,
             int4 = type == at::kByte && packed.dim() == 3;
  const int64_t per_tile = int8 ? 2 * flab::kAmxPairs : flab::kAmxPairs;  // dim 1 is K (int8) or K pairs
  return (bf16 || int8 || int4) && packed.size(1) % per_tile == 0 && flab::amx_ready();
}

// bf16 rows as the AMX tiles read them: contiguous, zero rows up to a whole group of 16 (not written out)
torch::Tensor amx_rows(const torch::Tensor& x) {
  const int64_t M = x.size(0), padded = (M + 15) / 16 * 16;
  return padded == M ? x.contiguous() : at::constant_pad_nd(x, {0, 0, 0, padded - M});
}

const uint16_t* bf16_data(const torch::Tensor& x) { return reinterpret_cast<const uint16_t*>(x.data_ptr()); }

}  // namespace

int64_t linear_max_rows(const torch::Tensor& packed) {
#if defined(__AVX512F__)
  if (packed.scalar_type() == at::kChar) return kEveryRow;
  if (packed.scalar_type() == at::kBFloat16) return flab::amx_ready() && !amx_packing(packed) ? kGemvMaxRows : kBf16MaxRows;
#endif
  return kGemvMaxRows;
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                     int64_t N, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "linear: x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(packed.dim() == 4 || packed.dim() == 3, "linear: packed weight of unexpected rank");
  TORCH_CHECK(packed.is_contiguous() && packed.size(0) * flab::kBlock >= N, "linear: packed weight too small");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "linear: bias must be fp32 (N,)");
  const int64_t M = x.size(0), NB = packed.size(0);
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  if (packed.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(packed.dim() == 4 && packed.size(2) == flab::kBlock && packed.size(3) == 2, "linear: bf16 packing");
    const int64_t KP = packed.size(1);
    TORCH_CHECK(2 * KP >= K, "linear: packed K too small");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "linear: x must be bf16 or fp32");
    const bool dot = flab::has_bf16_dot() && x.scalar_type() == at::kBFloat16;
    auto xin = dot ? x : x.to(at::kFloat);
    if (2 * KP != K) xin = at::constant_pad_nd(xin, {0, 2 * KP - K});  // odd K: a zero partner for the last pair
    xin = xin.contiguous();
    const auto* w = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
    const void* xp = xin.data_ptr();
    void* op = out.data_ptr();
    const bool out_bf16 = out.scalar_type() == at::kBFloat16;
    TORCH_CHECK(out_bf16 || out.scalar_type() == at::kFloat, "linear: output must be bf16 or fp32");
    if (dot && M > kGemvMaxRows && amx_packing(packed)) {
      const auto xt = amx_rows(xin);
      const uint16_t* xa = bf16_data(xt);
      claim_parallel(NB, M * N * K, 2, [&](int64_t b0, int64_t b1) {
        flab::gemm_bf16_amx_blocks(xa, M, 2 * KP, w, KP, b, N, b0, b1, op, out_bf16);
      });
      return out;
    }
    claim_parallel(NB, M * N * K, 4, [&](int64_t b0, int64_t b1) {
      flab::gemv_bf16_blocks(xp, dot, M, 2 * KP, w, KP, b, N, b0, b1, op, out_bf16);
    });
    return out;
  }
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.dim() == 3 && packed.size(1) == K, "linear: fp32 packing");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "linear: fp32 weights need fp32 x");
  auto xin = x.contiguous();
  const float* xp = xin.data_ptr<float>();
  const float* w = packed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  claim_parallel(NB, M * N * K, 4, [&](int64_t b0, int64_t b1) { flab::gemv_f32_blocks(xp, M, K, w, K, b, N, b0, b1, op); });
  return out;
}

torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const c10::optional<torch::Tensor>& bias, int64_t N, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "linear_int8: x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 3 && packed.size(1) == K &&
                  packed.size(2) == flab::kBlock && packed.is_contiguous() && packed.size(0) * flab::kBlock >= N,
              "linear_int8: int8 packing");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N && scales.is_contiguous(),
              "linear_int8: scales must be fp32 (N,)");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "linear_int8: bias must be fp32 (N,)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "linear_int8: x must be bf16 or fp32");
  const int64_t M = x.size(0), NB = packed.size(0);
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  const auto* w = packed.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  void* op = out.data_ptr();
  const bool out_bf16 = out.scalar_type() == at::kBFloat16;
  if (x.scalar_type() == at::kBFloat16 && M > kGemvMaxRows && amx_packing(packed)) {
    const auto xt = amx_rows(x);
    const uint16_t* xp = bf16_data(xt);
    claim_parallel(NB, M * N * K, 2, [&](int64_t b0, int64_t b1) {
      flab::gemm_i8_amx_blocks(xp, M, K, w, K, sp, b, N, b0, b1, op, out_bf16);
    });
    return out;
  }
  auto xin = x.to(at::kFloat).contiguous();
  const float* xp = xin.data_ptr<float>();
  claim_parallel(NB, M * N * K, 4, [&](int64_t b0, int64_t b1) {
    flab::gemv_i8_blocks(xp, M, K, w, K, sp, b, N, b0, b1, op, out_bf16);
  });
  return out;
}

torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const torch::Tensor& offsets, const c10::optional<torch::Tensor>& bias, int64_t N, int64_t K,
                          int64_t group_size, int64_t mm_rows) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "linear_int4: x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0, "linear_int4: the group size must be even");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == flab::kBlock &&
                  packed.is_contiguous() && packed.size(0) * flab::kBlock >= N && (2 * packed.size(1)) % group_size == 0 &&
                  2 * packed.size(1) >= K,
              "linear_int4: int4 packing");
  const int64_t NB = packed.size(0), KP = packed.size(1), G = 2 * KP / group_size;
  const bool bf16_scales = scales.scalar_type() == at::kBFloat16;
  for (const auto* t : {&scales, &offsets})
    TORCH_CHECK((t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16) &&
                    t->scalar_type() == scales.scalar_type() && t->is_contiguous() && t->dim() == 3 &&
                    t->size(0) == NB && t->size(1) == G && t->size(2) == flab::kBlock,
                "linear_int4: scales and offsets must be both fp32 or both bf16 (NB, G, 16)");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "linear_int4: bias must be fp32 (N,)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "linear_int4: x must be bf16 or fp32");
  const int64_t M = x.size(0);
  if (M == 0) return torch::empty({M, N}, x.options());
  const auto* w = packed.data_ptr<uint8_t>();
  const void* sp = scales.data_ptr();
  const void* op_ = offsets.data_ptr();
  if (x.scalar_type() == at::kBFloat16 && M >= kInt4AmxMinRows && M <= kInt4AmxMaxRows &&
      amx_packing(packed)) {  // AMX tiles over the weight dequantized a block pair at a time
    auto out = torch::empty({M, N}, x.options());
    const auto xt = amx_rows(2 * KP != K ? at::constant_pad_nd(x, {0, 2 * KP - K}) : x);
    const uint16_t* xp = bf16_data(xt);
    const float* b = bias ? bias->data_ptr<float>() : nullptr;
    void* op = out.data_ptr();
    claim_parallel(NB, M * N * K, 2, [&](int64_t b0, int64_t b1) {
      flab::gemm_i4_amx_blocks(xp, M, 2 * KP, w, KP, G, group_size / 2, sp, op_, bf16_scales, b, N, b0, b1, op, true);
    });
    return out;
  }
  if (M >= mm_rows) {  // many rows: the weight dequantized once, torch's GEMM (oneDNN, AMX where present) over it
    auto wt = torch::empty({2 * KP, NB * flab::kBlock}, x.options());  // W^T, in x's dtype
    const bool wt_bf16 = wt.scalar_type() == at::kBFloat16;
    void* wtp = wt.data_ptr();
    claim_parallel(NB, N * K, 1, [&](int64_t b0, int64_t b1) {
      flab::dequant_i4_blocks(w, KP, G, group_size / 2, sp, op_, bf16_scales, NB * flab::kBlock, b0, b1, wtp, wt_bf16);
    });
    auto xin = 2 * KP != K ? at::constant_pad_nd(x, {0, 2 * KP - K}) : x;
    auto y = at::mm(xin, wt);  // (M, NB * 16)
    if (NB * flab::kBlock != N) y = y.narrow(1, 0, N);
    if (bias) y.add_(*bias);  // computed in fp32, rounded to x's dtype (as the module's y + bias)
    return y.contiguous();
  }
  auto out = torch::empty({M, N}, x.options());
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  void* op = out.data_ptr();
  const bool out_bf16 = out.scalar_type() == at::kBFloat16;
  auto xin = x.to(at::kFloat);
  if (2 * KP != K) xin = at::constant_pad_nd(xin, {0, 2 * KP - K});
  xin = xin.contiguous();
  auto xsum = xin.view({M, G, group_size}).sum(-1).contiguous();  // (M, G)
  const float* xp = xin.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>();
  claim_parallel(NB, M * N * K, 2, [&](int64_t b0, int64_t b1) {
    flab::gemv_i4_blocks(xp, M, 2 * KP, xs, G, w, KP, group_size / 2, sp, op_, bf16_scales, b, N, b0, b1, op,
                         out_bf16);
  });
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                                  const torch::Tensor& weight, double eps, double offset) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "rms_norm: x must be contiguous (T, H)");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.numel() == H && weight.is_contiguous() && weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight must be (H,) of x's dtype");
  TORCH_CHECK(!residual || (residual->sizes() == x.sizes() && residual->is_contiguous() &&
                            residual->scalar_type() == x.scalar_type()),
              "rms_norm: residual must be contiguous, x's shape and dtype");
  auto out = torch::empty_like(x);
  auto res_out = residual ? torch::empty_like(x) : torch::empty({0}, x.options());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat, "rms_norm: bf16 or fp32 only");
  parallel(T, T * H < kSerialElements ? 0 : kSerialWork, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * H;
      if (bf16) {
        flab::rms_norm_row<uint16_t>(ptr<uint16_t>(x) + o, residual ? ptr<uint16_t>(*residual) + o : nullptr,
                                     ptr<uint16_t>(weight), eps, offset, H, ptr<uint16_t>(out) + o,
                                     residual ? ptr<uint16_t>(res_out) + o : nullptr);
      } else {
        flab::rms_norm_row<float>(ptr<float>(x) + o, residual ? ptr<float>(*residual) + o : nullptr,
                                  ptr<float>(weight), eps, offset, H, ptr<float>(out) + o,
                                  residual ? ptr<float>(res_out) + o : nullptr);
      }
    }
  });
  return {out, res_out};
}

void rope(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads, int64_t D) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) >= heads * D, "rope: x must be (T, >= heads * D) rows");
  const int64_t T = x.size(0);
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == T && cos.size(1) == 1 && cos.is_contiguous() && sin.sizes() == cos.sizes() &&
                  sin.is_contiguous() && cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rope: cos and sin must be contiguous (T, 1, rd) of x's dtype");
  const int64_t rd = cos.size(2);
  TORCH_CHECK(rd % 2 == 0 && rd <= D, "rope: the rotary dim must be even and at most the head dim");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat, "rope: bf16 or fp32 only");
  const int64_t xs = x.stride(0);
  parallel(T, T * heads * rd < kSerialElements ? 0 : kSerialWork, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (bf16)
        flab::rope_row<uint16_t>(ptr<uint16_t>(x) + t * xs, ptr<uint16_t>(cos) + t * rd, ptr<uint16_t>(sin) + t * rd,
                                 heads, D, rd);
      else
        flab::rope_row<float>(ptr<float>(x) + t * xs, ptr<float>(cos) + t * rd, ptr<float>(sin) + t * rd, heads, D,
                              rd);
    }
  });
}

torch::Tensor silu_and_mul(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, "silu_and_mul: x must be contiguous (T, 2I)");
  const int64_t T = x.size(0), I = x.size(1) / 2;
  auto out = torch::empty({T, I}, x.options());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat, "silu_and_mul: bf16 or fp32 only");
  parallel(T, T * I < kSerialElements ? 0 : kSerialWork, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (bf16)
        flab::silu_and_mul_row<uint16_t>(ptr<uint16_t>(x) + r * 2 * I, I, ptr<uint16_t>(out) + r * I);
      else
        flab::silu_and_mul_row<float>(ptr<float>(x) + r * 2 * I, I, ptr<float>(out) + r * I);
    }
  });
  return out;
}

void store_kv(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_cache, torch::Tensor& v_cache,
              const torch::Tensor& slots) {
  const int64_t T = k.size(0);
  const int64_t kw = k_cache.size(2) * k_cache.size(3), vw = v_cache.size(2) * v_cache.size(3);
  TORCH_CHECK(k.dim() == 2 && v.dim() == 2 && k.size(1) == kw && v.size(1) == vw && v.size(0) == T &&
                  k.stride(1) == 1 && v.stride(1) == 1,
              "store_kv: k / v must be (T, Hkv * D) rows");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(),
              "store_kv: k / v must have the caches' dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == T,
              "store_kv: slots must be int64 (T,)");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1), es = k.element_size();
  const int64_t* sl = slots.data_ptr<int64_t>();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(sl[t] >= 0 && sl[t] < num_slots, "store_kv: a slot outside the cache");
    std::memcpy(kc + sl[t] * kw * es, kp + t * k.stride(0) * es, kw * es);
    std::memcpy(vc + sl[t] * vw * es, vp + t * v.stride(0) * es, vw * es);
  }
}

torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& seq_lens, double scale,
                           double softcap, int64_t window, const c10::optional<torch::Tensor>& sinks) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "paged_decode: q must be (S, Hq, D) rows");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode: caches must be contiguous (NB, BS, Hkv, D)");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "paged_decode: q and the caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  block_tables.is_contiguous() && seq_lens.is_contiguous(),
              "paged_decode: block_tables and seq_lens must be contiguous int32");
  const int64_t S = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && Hq % Hkv == 0 && seq_lens.size(0) == S && block_tables.size(0) == S,
              "paged_decode: shapes do not match");
  TORCH_CHECK(!sinks || (sinks->scalar_type() == at::kFloat && sinks->numel() == Hq && sinks->is_contiguous()),
              "paged_decode: sinks must be fp32 (Hq,)");
  flab::DecodeShape shape{Hq, Hkv, D, v_cache.size(3), k_cache.size(1), block_tables.size(1), q.stride(0),
                          static_cast<float>(scale), static_cast<float>(softcap), window};
  auto out = torch::empty({S, Hq, shape.v_head_dim}, q.options());
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(lens[s] >= 1 && (lens[s] + shape.block_size - 1) / shape.block_size <= shape.max_blocks,
                "paged_decode: a sequence length outside its block table");
  const float* sink = sinks ? sinks->data_ptr<float>() : nullptr;
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || q.scalar_type() == at::kFloat, "paged_decode: bf16 or fp32 only");
  int64_t work = 0, longest = 0;
  for (int64_t s = 0; s < S; ++s) {
    work += lens[s];
    longest = std::max<int64_t>(longest, lens[s] - flab::window_begin(lens[s], shape));
  }
  // fewer (sequence, KV head) items than two per thread and long contexts: each context split into chunks of
  // whole blocks, at least kMinChunk tokens, computed apart and merged (flash-decoding's split)
  const int64_t items = S * Hkv, threads = work * Hq * D * 2 < kSerialWork ? 1 : at::get_num_threads();
  const int64_t chunks = items >= 2 * threads ? 1 : std::min((2 * threads + items - 1) / items, longest / kMinChunk);
  if (chunks <= 1) {
    claim_parallel(items, work * Hq * D * 2, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t s = i / Hkv, h = i % Hkv;
        const int32_t* table = tables + s * shape.max_blocks;
        if (bf16) {
          flab::paged_decode_head<uint16_t>(ptr<uint16_t>(q) + s * shape.q_stride, ptr<uint16_t>(k_cache),
                                            ptr<uint16_t>(v_cache), table, lens[s], h, sink, shape,
                                            ptr<uint16_t>(out) + s * Hq * shape.v_head_dim);
        } else {
          flab::paged_decode_head<float>(ptr<float>(q) + s * shape.q_stride, ptr<float>(k_cache),
                                         ptr<float>(v_cache), table, lens[s], h, sink, shape,
                                         ptr<float>(out) + s * Hq * shape.v_head_dim);
        }
      }
    });
    return out;
  }
  const int64_t G = Hq / Hkv, DV = shape.v_head_dim, BS = shape.block_size;
  // per item, field by field as the merge reads them: m (chunks, G) | l (chunks, G) | acc (chunks, G, DV)
  const int64_t per_item = chunks * G * (2 + DV);
  auto state = torch::empty({items, per_item}, q.options().dtype(at::kFloat));
  float* st = state.data_ptr<float>();
  auto chunk_range = [&](int64_t s, int64_t c) {  // chunk c of sequence s: tokens [t0, t1), whole blocks
    const int64_t begin = flab::window_begin(lens[s], shape);
    const int64_t per = ((lens[s] - begin + chunks - 1) / chunks + BS - 1) / BS * BS;
    const int64_t t0 = std::min<int64_t>(lens[s], begin + c * per);
    return std::make_pair(t0, std::min<int64_t>(lens[s], t0 + per));
  };
  claim_parallel(items * chunks, work * Hq * D * 2, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t item = i / chunks, c = i % chunks, s = item / Hkv, h = item % Hkv;
      const auto [t0, t1] = chunk_range(s, c);
      float* m = st + item * per_item + c * G;
      float* l = m + chunks * G;
      float* acc = st + item * per_item + 2 * chunks * G + c * G * DV;
      const int32_t* table = tables + s * shape.max_blocks;
      if (bf16)
        flab::paged_decode_partial<uint16_t>(ptr<uint16_t>(q) + s * shape.q_stride, ptr<uint16_t>(k_cache),
                                             ptr<uint16_t>(v_cache), table, t0, t1, h, shape, m, l, acc);
      else
        flab::paged_decode_partial<float>(ptr<float>(q) + s * shape.q_stride, ptr<float>(k_cache),
                                          ptr<float>(v_cache), table, t0, t1, h, shape, m, l, acc);
    }
  });
  for (int64_t item = 0; item < items; ++item) {  // merge each item's chunks
    const int64_t s = item / Hkv, h = item % Hkv;
    const float* m = st + item * per_item;
    if (bf16)
      flab::paged_decode_merge<uint16_t>(m, m + chunks * G, m + 2 * chunks * G, chunks, h, sink, shape,
                                         ptr<uint16_t>(out) + s * Hq * DV);
    else
      flab::paged_decode_merge<float>(m, m + chunks * G, m + 2 * chunks * G, chunks, h, sink, shape,
                                      ptr<float>(out) + s * Hq * DV);
  }
  return out;
}

}  // namespace flab
