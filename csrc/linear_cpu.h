// Linear layers for CPU inference, y = x W^T + b, optionally followed by the exact GELU, with W packed once into
// the layout the kernel loads: bfloat16 on AMX tiles or AVX512-BF16 dot products, float32 on AVX-512 FMAs. At a few
// hundred rows (the backbone's linears at batch 1) they run the same GEMMs with less around them than oneDNN's
// primitive.
#pragma once

#include <cstdint>

#include "cpu_isa.h"

namespace t2t {

// bfloat16: in_features and out_features are multiples of this (a tile's depth in bf16, and the two tiles' width
// of a step); rows of x per step: two A tiles.
constexpr int64_t kLinearMultiple = 32;
constexpr int64_t kLinearRows = 32;
// Without AMX tiles: output features per panel of the packed weight (four vectors; float32: any sizes, the last
// panel zero-padded; bfloat16: the last panel may hold 32), and rows per block of accumulators (6 x 4 vectors).
constexpr int64_t kLinearPanel = 64;
constexpr int64_t kLinearPanelRows = 6;

struct LinearProblem {
  int dtype;                                // of x, W, the bias and y: kBFloat16 or kFloat32 (restructurize_unfold.h)
  int64_t rows, in_features, out_features;  // M, K, N
  const void* x;                            // M rows of K, x_stride elements apart
  int64_t x_stride;
  const void* packed;  // W (N, K) as pack_linear_weight wrote it
  const void* bias;    // N, or nullptr
  bool gelu;           // the exact GELU (erf) after the bias
  void* y;             // (M, N), contiguous
};

// Elements of W (N, K) packed: bfloat16 N * K, float32 N rounded up to kLinearPanel, times K.
int64_t packed_linear_elements(int dtype, int64_t out_features, int64_t in_features);

// W (N, K), row-major -> packed. bfloat16: for each block of 16 output features and each step of 32 inputs, one
// 1 KiB tile of 16 rows (input pairs) x 16 columns (features) x 2 (the pair); float32: per panel of kLinearPanel
// output features and per input, the panel's weights (zero past N).
void pack_linear_weight(int dtype, const void* w, int64_t out_features, int64_t in_features, void* packed);

// The forward with `isa`: bfloat16 on AMX tiles (kAmx) or AVX512-BF16 dot products (kAvx512), float32 on AVX-512
// FMAs (kAvx512 or kAmx); std::invalid_argument for another isa or one this CPU (or the OS) cannot run.
void linear_forward_cpu(const LinearProblem& p, Isa isa, int threads);

// bfloat16: output rows [row, row + rows) (rows <= kLinearRows) and feature pairs [first_pair, last_pair) (32
// features each) on the calling thread's tiles; a: those rows of x, a_stride elements apart, readable for
// kLinearRows rows (zero past `rows`). linear_forward_cpu's threads call it (linear_cpu_amx.cpp).
void linear_rows_amx(const LinearProblem& p, const uint16_t* a, int64_t a_stride, int64_t row, int64_t rows,
                     int64_t first_pair, int64_t last_pair);

// Without tiles, a thread fetches its next panel into L2 while it computes this one, the panel's cache lines spread
// evenly over this panel's blocks of kLinearPanelRows rows: block b asks for lines [first(b), first(b) + count(b)).
struct NextPanelLines {
  int64_t lines, per_block;
  NextPanelLines(int64_t panel_bytes, int64_t rows, bool next)
      : lines(next ? panel_bytes / 64 : 0),
        per_block(rows < kLinearPanelRows ? 0 : (lines + rows / kLinearPanelRows - 1) / (rows / kLinearPanelRows)) {}
  int64_t first(int64_t block) const { return block * per_block < lines ? block * per_block : lines; }
  int64_t count(int64_t block) const { return lines - first(block) < per_block ? lines - first(block) : per_block; }
};

// Without tiles: output rows [row, row + rows) of panel `panel`; next_panel: the packed panel the calling thread
// computes next (fetched into L2 meanwhile) or nullptr. float32 in linear_cpu_avx512.cpp, bfloat16 (the AMX
// packing read as vectors of 16 features' input pairs) in linear_cpu_avx512_bf16.cpp.
void linear_rows_f32(const LinearProblem& p, int64_t row, int64_t rows, int64_t panel, const void* next_panel);
void linear_rows_bf16(const LinearProblem& p, int64_t row, int64_t rows, int64_t panel, const void* next_panel);

}  // namespace t2t
