// Run-time choice of the vectorised CPU kernels' instruction set.
#include "cpu_isa.h"

#include <stdexcept>
#include <string>

namespace t2t {

Isa best_cpu_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

const CpuKernels& cpu_kernels(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(best_cpu_isa())) {
    throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(isa) + " kernels (best: " +
                                isa_name(best_cpu_isa()) + ")");
  }
  switch (isa) {
    case Isa::kAvx512:
      return avx512::kernels;
    case Isa::kAvx2:
      return avx2::kernels;
    case Isa::kBaseline:
      return baseline::kernels;
  }
  throw std::invalid_argument("unknown CPU kernel ISA code " + std::to_string(static_cast<int>(isa)));
}

}  // namespace t2t
