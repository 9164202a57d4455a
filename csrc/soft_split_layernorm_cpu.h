// Soft split + LayerNorm forward on the CPU, fused: each thread gathers one window row (b, oh) of the unfold
// into a buffer it keeps in cache and normalises it from there, so the (B, L, C*k*k) rows are written once,
// already normalised, in the output dtype.
#pragma once

#include <cstdint>

#include "cpu_isa.h"
#include "restructurize_unfold.h"

namespace t2t {

// y (B, L, F) contiguous in y_dtype (kFloat32 or kBFloat16) <- LayerNorm over F of the unfold of x (x_dtype
// kFloat32 or kBFloat16, addressed through g's strides), float32 statistics, weight/bias F floats; mean and
// rstd (B*L floats) for the backward.
void soft_split_layernorm_forward_cpu(uintptr_t x, int x_dtype, const UnfoldGeometry& g, const float* weight,
                                      const float* bias, float eps, uintptr_t y, int y_dtype, float* mean,
                                      float* rstd, Isa isa, int threads);

}  // namespace t2t
