// The kernels of cpu_kernels.inc for AVX2 with FMA, as t2t::avx2::kernels.
// Everything with external linkage is included before the target pragma (see cpu_vector.h).
#include <cstdint>

#include "cpu_isa.h"
#include "favor_attention_cpu.h"
#include "restructurize_unfold.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c,bmi2")
#endif

#define T2T_VECTOR_BYTES 32
#define T2T_VECTOR_REGISTERS 16

namespace t2t {
namespace avx2 {
#include "cpu_kernels.inc"
}  // namespace avx2
}  // namespace t2t
