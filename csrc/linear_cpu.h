// bfloat16 linear layers on AMX tiles, for CPU inference: y = x W^T + b, optionally followed by the exact GELU,
// with W packed once into the layout the tiles load. At a few hundred rows (the backbone's linears at batch 1)
// this runs the same GEMM with less around it than oneDNN's primitive.
#pragma once

#include <cstdint>

namespace t2t {

// in_features and out_features are multiples of this: a tile's depth in bf16, and the two tiles' width of a step.
constexpr int64_t kLinearMultiple = 32;
// Rows of x per step: two A tiles.
constexpr int64_t kLinearRows = 32;

struct LinearProblem {
  int64_t rows, in_features, out_features;  // M, K, N
  const uint16_t* x;                        // M rows of K bf16, x_stride elements apart
  int64_t x_stride;
  const uint16_t* packed;  // W (N, K) as pack_linear_weight wrote it
  const uint16_t* bias;    // N bf16, or nullptr
  bool gelu;               // the exact GELU (erf) after the bias
  uint16_t* y;             // (M, N) bf16, contiguous
};

// W (N, K), row-major bf16 -> packed (N * K elements): for each block of 16 output features and each step of 32
// inputs, one 1 KiB tile of 16 rows (input pairs) x 16 columns (features) x 2 (the pair).
void pack_linear_weight(const uint16_t* w, int64_t out_features, int64_t in_features, uint16_t* packed);

// The forward; std::invalid_argument when this CPU (or the OS) gives no AMX tiles.
void linear_forward_amx(const LinearProblem& p, int threads);

// Output rows [row, row + rows) (rows <= kLinearRows) and feature pairs [first_pair, last_pair) (32 features each)
// on the calling thread's tiles; a: those rows of x, a_stride elements apart, readable for kLinearRows rows (zero
// past `rows`). linear_forward_amx's threads call it (linear_cpu_amx.cpp).
void linear_rows_amx(const LinearProblem& p, const uint16_t* a, int64_t a_stride, int64_t row, int64_t rows,
                     int64_t first_pair, int64_t last_pair);

}  // namespace t2t
