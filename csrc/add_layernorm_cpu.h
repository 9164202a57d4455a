// Residual add + LayerNorm forward on the CPU, fused: the pre-norm blocks' `x = x + f(x)` followed by the next
// LayerNorm, in one pass over the rows instead of an add and a LayerNorm that each read and write them.
#pragma once

#include <cstdint>

#include "cpu_isa.h"
#include "restructurize_unfold.h"  // DType codes

namespace t2t {

// The rows of one call: x and residual `rows` x `features` in `dtype` (kFloat32 or kBFloat16), rows
// `x_stride` / `residual_stride` elements apart with adjacent elements along a row; sum and normed contiguous.
struct AddLayerNormProblem {
  int dtype;
  int64_t rows;
  int64_t features;
  const void* x;
  int64_t x_stride;
  const void* residual;
  int64_t residual_stride;
  const float* weight;  // `features` floats
  const float* bias;    // `features` floats
  float eps;
  void* sum;            // x + residual, rounded to dtype
  void* normed;         // LayerNorm of sum (float32 statistics and affine), rounded to dtype
};

void add_layernorm_forward_cpu(const AddLayerNormProblem& p, Isa isa, int threads);

}  // namespace t2t
