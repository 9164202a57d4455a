// CPU instruction sets the vectorised CPU kernels are compiled for, and the choice among them at run time.
//
// The kernels of cpu_kernels.inc are compiled four times, once per translation unit cpu_kernels_<isa>.cpp
// with that unit's `#pragma GCC target`, into the namespaces t2t::avx512_bf16 (AVX-512 with BF16 dot products),
// t2t::avx512, t2t::avx2 and t2t::baseline. Each unit exports one table of entry points (CpuKernels); callers pick
// a table with cpu_kernels(isa). The
// orchestration (threads, scratch, reductions) is ordinary code compiled for the baseline ISA.
#pragma once

#include <cstdint>

namespace t2t {

// Ordered: a CPU that runs one runs those below it. kAmx is AVX-512 with AMX-BF16 tiles that the OS lets this
// process use: the kernels with tile code (the attention kernel's bfloat16 products) take them, the others run
// their AVX-512 code.
enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

struct FavorProblem;  // favor_attention_cpu.h

// Entry points of the vectorised kernels, one table per ISA. Sizes are int64_t; pointers are the caller's
// buffers (checked in bindings.cpp). dtype codes are t2t::DType values (kFloat32 or kBFloat16 here).
struct CpuKernels {
  // LayerNorm of `rows` gathered rows of `features` elements (src: storage dtype `src_dtype`, rows
  // `src_stride` elements apart) into dst (dtype `dst_dtype`, rows of `features`), with float32 statistics
  // and affine parameters (weight/bias: `features` floats); writes mean[r], rstd[r].
  void (*layernorm_rows)(const void* src, int src_dtype, int64_t src_stride, int64_t rows, int64_t features,
                         const float* weight, const float* bias, float eps, void* dst, int dst_dtype, float* mean,
                         float* rstd);
  // sum = x + residual (rows of `features` elements, `x_stride` / `residual_stride` elements apart; dtype
  // kFloat32 or kBFloat16, the sum rounded to it), then normed = the LayerNorm of sum as layernorm_rows; sum and
  // normed contiguous rows.
  void (*add_layernorm_rows)(const void* x, int64_t x_stride, const void* residual, int64_t residual_stride,
                             int dtype, int64_t rows, int64_t features, const float* weight, const float* bias,
                             float eps, void* sum, void* normed);
  // FAVOR+ key side of one chunk of tokens, see favor_attention_cpu.cpp.
  void (*favor_key_chunk)(const FavorProblem& p, int64_t image, int64_t first, int64_t count, float* work,
                          float* chunk_max, float* chunk_s, float* chunk_z);
  // FAVOR+ query side of one chunk of tokens: y of those tokens.
  void (*favor_query_chunk)(const FavorProblem& p, int64_t image, int64_t first, int64_t count,
                            float* work);
  // Whether the FAVOR+ kernels project bfloat16 k and q by bfloat16 pair products when the problem gives w in
  // pairs (FavorProblem::w_pairs).
  bool favor_pairs;
  // out[c*9 + t] = taps[t][c] for c < channels: one window of a 3x3 soft split of channels-last tokens (taps: the
  // nine (ki, kj) taps' channel vectors, contiguous), elements of element_bytes (2, 4 or 8) copied bit for bit.
  void (*interleave_taps9)(const void* const* taps, void* out, int64_t channels, int element_bytes);
};

namespace avx512_bf16 { extern const CpuKernels kernels; }
namespace avx512 { extern const CpuKernels kernels; }
namespace avx2 { extern const CpuKernels kernels; }
namespace baseline { extern const CpuKernels kernels; }

// Every ISA, best first.
constexpr Isa kIsas[] = {Isa::kAmx, Isa::kAvx512, Isa::kAvx2, Isa::kBaseline};

// The best ISA this CPU runs (AVX-512 needs F, BW, DQ and VL; AVX2 needs FMA too; AMX needs AVX-512, AMX-TILE,
// AMX-BF16 and the kernel's permission for the tile data, asked for once).
Isa best_cpu_isa();
// The kernels for `isa` (kAmx: the AVX-512 ones; those with BF16 dot products where this CPU has them);
// std::invalid_argument when this CPU cannot run it.
const CpuKernels& cpu_kernels(Isa isa);
const char* isa_name(Isa isa);
// Whether this CPU has AVX-512 F, BW, DQ, VL and BF16 (the bf16 dot products of the attention kernel and of the
// bfloat16 linear without AMX tiles).
bool avx512_bf16_supported();

}  // namespace t2t
