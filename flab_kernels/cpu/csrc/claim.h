// Work sharing without a barrier on unclaimed work: the calling thread and a few helper threads claim chunks of a
// job from one atomic counter; the caller returns once every chunk is done, and waits only for chunks a helper
// has claimed and is running. A helper that is not scheduled (another process holds its core) claims nothing,
// and the caller does its share: on a machine whose cores are shared, a fork-join region (OpenMP) instead waits
// at its closing barrier for every thread to arrive, up to a scheduler time slice per region (docs/cpu_kernels.md,
// "the 545 ms round"). Correct with no helper at all (after a fork, or when none was started): the caller claims
// every chunk.
#pragma once

#include <cstdint>
#include <functional>

namespace flab {

// run chunk(i) for i in [0, n) on the calling thread and up to `threads` - 1 helpers; returns when all are done
void claim_run(int64_t n, int threads, const std::function<void(int64_t)>& chunk);

}  // namespace flab
