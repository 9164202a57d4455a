// Residual add + LayerNorm forward on the CPU: OpenMP over one contiguous range of rows per thread (the kernel
// prefetches the rows ahead within its range), the vectorised rows of cpu_kernels.inc.
#include "add_layernorm_cpu.h"

namespace t2t {

namespace {
// below this many elements a second thread costs more than it saves
constexpr int64_t kMinParallelElements = 1 << 14;
}  // namespace

void add_layernorm_forward_cpu(const AddLayerNormProblem& p, Isa isa, int threads) {
  const CpuKernels& kernels = cpu_kernels(isa);
  threads = threads < 1 || p.rows * p.features < kMinParallelElements ? 1 : threads;
  const int64_t elem = element_size(p.dtype);
  const int64_t per_thread = (p.rows + threads - 1) / threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int thread = 0; thread < threads; ++thread) {
    const int64_t first = thread * per_thread;
    const int64_t count = p.rows - first < per_thread ? p.rows - first : per_thread;
    if (count <= 0) continue;
    const int64_t out_offset = first * p.features * elem;
    kernels.add_layernorm_rows(static_cast<const char*>(p.x) + first * p.x_stride * elem, p.x_stride,
                               static_cast<const char*>(p.residual) + first * p.residual_stride * elem,
                               p.residual_stride, p.dtype, count, p.features, p.weight, p.bias, p.eps,
                               static_cast<char*>(p.sum) + out_offset, static_cast<char*>(p.normed) + out_offset);
  }
}

}  // namespace t2t
