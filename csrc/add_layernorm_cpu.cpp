// Residual add + LayerNorm forward on the CPU: OpenMP over blocks of rows, the vectorised rows of cpu_kernels.inc.
#include "add_layernorm_cpu.h"

namespace t2t {

namespace {
constexpr int64_t kRowsPerBlock = 16;
// below this many elements a second thread costs more than it saves
constexpr int64_t kMinParallelElements = 1 << 14;
}  // namespace

void add_layernorm_forward_cpu(const AddLayerNormProblem& p, Isa isa, int threads) {
  const CpuKernels& kernels = cpu_kernels(isa);
  threads = threads < 1 ? 1 : threads;
  const int64_t elem = p.dtype == kFloat32 ? 4 : 2;
  const int64_t blocks = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const bool parallel = threads > 1 && p.rows * p.features >= kMinParallelElements;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t first = block * kRowsPerBlock;
    const int64_t count = p.rows - first < kRowsPerBlock ? p.rows - first : kRowsPerBlock;
    const int64_t out_offset = first * p.features * elem;
    kernels.add_layernorm_rows(static_cast<const char*>(p.x) + first * p.x_stride * elem, p.x_stride,
                               static_cast<const char*>(p.residual) + first * p.residual_stride * elem,
                               p.residual_stride, p.dtype, count, p.features, p.weight, p.bias, p.eps,
                               static_cast<char*>(p.sum) + out_offset, static_cast<char*>(p.normed) + out_offset);
  }
}

}  // namespace t2t
