// The kernels of cpu_kernels.inc for AVX-512 with BF16 instructions, as t2t::avx512_bf16::kernels: those of
// t2t::avx512, but for FAVOR+ on bfloat16 inputs, whose projections take pair products (vdpbf16ps), and for the
// bfloat16 outputs, rounded by vcvtneps2bf16 (float32 denormals become zeros of their sign).
// Everything with external linkage is included before the target pragma (see cpu_vector.h).
#include <immintrin.h>

#include <cstdint>

#include "cpu_isa.h"
#include "favor_attention_cpu.h"
#include "restructurize_unfold.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi2")
#endif

#define T2T_VECTOR_BYTES 64
#define T2T_VECTOR_REGISTERS 32
#define T2T_MASKED_TAILS 1
#define T2T_BF16_PAIRS 1

namespace t2t {
namespace avx512_bf16 {
#include "cpu_kernels.inc"
}  // namespace avx512_bf16
}  // namespace t2t
