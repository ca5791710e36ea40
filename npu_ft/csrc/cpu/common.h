// Shared helpers of npu-ft's native CPU kernels (built by npu_ft/ops/backends/cpu/_native.py).
//
// Every kernel file registers its primitives in the private "npu_ft_cpu" op namespace with
// TORCH_LIBRARY_FRAGMENT + TORCH_LIBRARY_IMPL(npu_ft_cpu, CPU, m). The Python kernels of the
// public npu_ft ops (npu_ft/ops/backends/cpu/*.py) allocate the outputs and call these primitives,
// which only read and write contiguous CPU buffers.
#pragma once

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace npu_ft_cpu {

using i64 = int64_t;

// Work per parallel task, in values: a call with fewer than twice this many runs on the calling
// thread (a parallel region costs ~10 us on an idle machine, and a scheduler time slice on a busy
// one, where every thread of the region must get a core). Dequantizing costs ~0.3 ns per value, so
// its tasks are larger; torch's own elementwise grain is 32768.
constexpr i64 kTaskValues = 1 << 15;
constexpr i64 kCheapTaskValues = 1 << 18;

// Calls fn(b0, b1) over the block ranges [b0, b1) covering all ceil(n / blocksize) blocks, split
// over torch's intra-op thread pool (at::parallel_for, torch.get_num_threads() threads) in tasks of
// at least values_per_task values.
template <typename F>
inline void for_each_block_range(i64 n, i64 blocksize, i64 values_per_task, const F& fn) {
    const i64 nblocks = (n + blocksize - 1) / blocksize;
    const i64 grain = std::max<i64>(1, values_per_task / blocksize);
    at::parallel_for(0, nblocks, grain, fn);
}

// TORCH_CHECKs that t is a contiguous CPU tensor of dtype with at least min_numel elements.
inline void check_buffer(const at::Tensor& t, const char* name, at::ScalarType dtype, i64 min_numel) {
    TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
    TORCH_CHECK(t.numel() >= min_numel, name, ": expected at least ", min_numel, " elements, got ", t.numel());
}

inline void check_blocksize(i64 blocksize) {
    TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "blocksize: expected a positive even number, got ", blocksize);
}

}  // namespace npu_ft_cpu
