// The kernels of cpu_kernels.inc for the build's baseline (x86-64: SSE2; other architectures: their default), as t2t::baseline::kernels.
// Everything with external linkage is included before the target pragma (see cpu_vector.h).
#include <cstdint>

#include "cpu_isa.h"
#include "favor_attention_cpu.h"
#include "restructurize_unfold.h"


#define T2T_VECTOR_BYTES 16
#define T2T_VECTOR_REGISTERS 16

namespace t2t {
namespace baseline {
#include "cpu_kernels.inc"
}  // namespace baseline
}  // namespace t2t
