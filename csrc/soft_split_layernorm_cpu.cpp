// Soft split + LayerNorm forward on the CPU: OpenMP over window rows, the gather of restructurize_unfold_cpu.cpp,
// then the vectorised LayerNorm of cpu_kernels.inc on the gathered rows.
#include "soft_split_layernorm_cpu.h"

#include <vector>

namespace t2t {

void soft_split_layernorm_forward_cpu(uintptr_t x, int x_dtype, const UnfoldGeometry& g, const float* weight,
                                      const float* bias, float eps, uintptr_t y, int y_dtype, float* mean,
                                      float* rstd, Isa isa, int threads) {
  const CpuKernels& kernels = cpu_kernels(isa);
  threads = threads < 1 ? 1 : threads;
  const int64_t n = features(g);
  const int64_t groups = g.batch * g.out_h;
  const int64_t x_bytes = element_size(x_dtype);
  const int64_t y_bytes = element_size(y_dtype);
  char* out = reinterpret_cast<char*>(y);
#pragma omp parallel num_threads(threads)
  {
    WindowRowGather gather(g, x_bytes, kernels);
    std::vector<char> rows(g.out_w * n * x_bytes);
#pragma omp for schedule(static)
    for (int64_t group = 0; group < groups; ++group) {
      gather(x, rows.data(), group);
      const int64_t first = group * g.out_w;
      kernels.layernorm_rows(rows.data(), x_dtype, n, g.out_w, n, weight, bias, eps, out + first * n * y_bytes,
                             y_dtype, mean + first, rstd + first);
    }
  }
}

}  // namespace t2t
