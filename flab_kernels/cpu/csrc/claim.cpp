// claim.h: one job at a time, published through one 64-bit atomic `state` = generation (24 bits) | chunks (20) |
// next chunk (20). A helper claims by compare-and-swap on the whole word, so a claim made on a stale generation
// fails; after a successful claim the job's fields cannot change until that chunk is done (the caller moves on
// only when every chunk of its job is done), so the helper reads them then.
#include "claim.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <pthread.h>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FLAB_PAUSE() _mm_pause()
#else
#define FLAB_PAUSE() ((void)0)
#endif

namespace flab {

namespace {

constexpr int kIdxBits = 20;
constexpr uint64_t kIdxMask = (uint64_t{1} << kIdxBits) - 1;
constexpr int kMaxHelpers = 63;
constexpr auto kSpin = std::chrono::microseconds(20);  // a helper spins this long for the next job, then sleeps

inline uint64_t pack(uint64_t gen, uint64_t n, uint64_t idx) { return (gen << (2 * kIdxBits)) | (n << kIdxBits) | idx; }
inline uint64_t gen_of(uint64_t s) { return s >> (2 * kIdxBits); }
inline uint64_t n_of(uint64_t s) { return (s >> kIdxBits) & kIdxMask; }
inline uint64_t idx_of(uint64_t s) { return s & kIdxMask; }

class Pool {
 public:
  // claims one chunk of the current job and runs it; false when none is left
  bool work_one() {
    uint64_t s = state_.load(std::memory_order_acquire);
    while (idx_of(s) < n_of(s)) {
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        (*fn_)(static_cast<int64_t>(idx_of(s)));
        done_.fetch_add(1, std::memory_order_acq_rel);
        return true;
      }
    }
    return false;
  }

  void run(int64_t n, int threads, const std::function<void(int64_t)>& chunk) {
    std::lock_guard<std::mutex> one_job(job_mutex_);  // callers from several threads take turns
    ensure_helpers(threads - 1);
    fn_ = &chunk;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (gen_of(state_.load(std::memory_order_relaxed)) + 1) & 0xffffff;
    state_.store(pack(gen, static_cast<uint64_t>(n), 0), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {  // seq_cst pairs: a helper either sees the job or is woken
      std::lock_guard<std::mutex> lock(wake_mutex_);
      wake_.notify_all();
    }
    while (work_one()) {
    }
    while (done_.load(std::memory_order_acquire) < n) FLAB_PAUSE();  // only chunks a helper is running
  }

 private:
  void ensure_helpers(int wanted) {
    wanted = std::min(wanted, kMaxHelpers);
    while (static_cast<int>(helpers_.size()) < wanted) {
      helpers_.emplace_back([this] { helper_loop(); });
      helpers_.back().detach();
    }
  }

  void helper_loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + kSpin;
      for (;;) {
        const uint64_t s = state_.load(std::memory_order_acquire);
        if (gen_of(s) != seen && idx_of(s) < n_of(s)) break;
        if (std::chrono::steady_clock::now() > spin_until) {
          std::unique_lock<std::mutex> lock(wake_mutex_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] {
            const uint64_t t = state_.load(std::memory_order_seq_cst);
            return gen_of(t) != seen && idx_of(t) < n_of(t);
          });
          sleepers_.fetch_sub(1, std::memory_order_acq_rel);
          break;
        }
        FLAB_PAUSE();
      }
      seen = gen_of(state_.load(std::memory_order_acquire));
      while (work_one()) {
      }
    }
  }

  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  const std::function<void(int64_t)>* fn_ = nullptr;
  std::mutex job_mutex_, wake_mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> helpers_;
};

Pool*& pool_ptr() {
  static Pool* p = nullptr;
  return p;
}

// never destroyed (detached helpers may outlive static destruction at exit); a forked child starts a fresh pool
// (the parent's helpers are not in it, and one of them may have held a mutex at the fork)
Pool& pool() {
  static std::once_flag once;
  std::call_once(once, [] {
    pool_ptr() = new Pool();
    pthread_atfork(nullptr, nullptr, [] { pool_ptr() = new Pool(); });
  });
  return *pool_ptr();
}

}  // namespace

// Which pool runs the chunks, read once from FLAB_CPU_POOL: "omp" (the default) OpenMP's fork-join regions, the
// pool torch's own ops use, so no second pool competes with it for the cores (on a quiet 2-core machine: batch-1
// decode 77 vs 65 tok/s, the transformers fallback 50 vs 42); "claim" the helpers above, which never wait at a
// barrier for a thread another process took off its core (on a loaded machine: 195-255 vs 734-1309 ms for one
// token's GEMVs; docs/cpu_kernels.md)
bool use_openmp() {
  static const bool omp = [] {
    const char* v = std::getenv("FLAB_CPU_POOL");
    return v == nullptr || std::strcmp(v, "claim") != 0;
  }();
  return omp;
}

void claim_run(int64_t n, int threads, const std::function<void(int64_t)>& chunk) {
  if (n <= 0) return;
  if (threads <= 1 || n == 1 || n > static_cast<int64_t>(kIdxMask)) {
    for (int64_t i = 0; i < n; ++i) chunk(i);
    return;
  }
  if (use_openmp()) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) chunk(i);
    return;
  }
  pool().run(n, threads, chunk);
}

}  // namespace flab
