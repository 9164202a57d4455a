// Run-time choice of the vectorised CPU kernels' instruction set.
#include "cpu_isa.h"

#include <stdexcept>
#include <string>

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace t2t {

namespace {

// Linux hands out the AMX tile registers' state (8 KiB per thread) only to a process that asks for it
// (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); a tile instruction without it is a SIGILL.
bool amx_usable() {
#if defined(__linux__) && defined(__x86_64__)
  static const bool usable = [] {
    constexpr int kArchRequestComponentPermission = 0x1023, kTileData = 18;
    return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
           syscall(SYS_arch_prctl, kArchRequestComponentPermission, kTileData) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

}  // namespace

Isa best_cpu_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    return amx_usable() ? Isa::kAmx : Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

bool avx512_bf16_supported() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx:
      return "amx";
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
    case Isa::kAmx:
    case Isa::kAvx512: {
      static const bool dot_products = avx512_bf16_supported();
      return dot_products ? avx512_bf16::kernels : avx512::kernels;
    }
    case Isa::kAvx2:
      return avx2::kernels;
    case Isa::kBaseline:
      return baseline::kernels;
  }
  throw std::invalid_argument("unknown CPU kernel ISA code " + std::to_string(static_cast<int>(isa)));
}

}  // namespace t2t
