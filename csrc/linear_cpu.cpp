// Threads of the linears of linear_cpu.h (the AMX tiles in linear_cpu_amx.cpp, the float32 FMAs in
// linear_cpu_avx512.cpp, the bfloat16 dot products in linear_cpu_avx512_bf16.cpp) and the weight packing.
#include "linear_cpu.h"

#include <omp.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "restructurize_unfold.h"

namespace t2t {

int64_t packed_linear_elements(int dtype, int64_t out_features, int64_t in_features) {
  if (dtype == kFloat32) return (out_features + kLinearPanel - 1) / kLinearPanel * kLinearPanel * in_features;
  return out_features * in_features;
}

void pack_linear_weight(int dtype, const void* w, int64_t out_features, int64_t in_features, void* packed) {
  if (dtype == kFloat32) {
    const float* source = static_cast<const float*>(w);
    float* out = static_cast<float*>(packed);
    for (int64_t panel = 0; panel * kLinearPanel < out_features; ++panel) {
      for (int64_t k = 0; k < in_features; ++k) {
        for (int64_t c = 0; c < kLinearPanel; ++c) {
          const int64_t n = panel * kLinearPanel + c;
          *out++ = n < out_features ? source[n * in_features + k] : 0.0f;
        }
      }
    }
    return;
  }
  const uint16_t* source = static_cast<const uint16_t*>(w);
  const int64_t steps = in_features / 32;
  for (int64_t block = 0; block < out_features / 16; ++block) {
    for (int64_t s = 0; s < steps; ++s) {
      uint16_t* tile = static_cast<uint16_t*>(packed) + (block * steps + s) * 512;
      for (int64_t pair = 0; pair < 16; ++pair) {
        for (int64_t column = 0; column < 16; ++column) {
          const uint16_t* from = source + (16 * block + column) * in_features + 32 * s + 2 * pair;
          tile[(pair * 16 + column) * 2] = from[0];
          tile[(pair * 16 + column) * 2 + 1] = from[1];
        }
      }
    }
  }
}

namespace {

// Threads split the output features (each keeps its share of W in cache across the row blocks); with fewer feature
// pairs than threads, the row blocks.
void forward_amx(const LinearProblem& p, int threads) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const int64_t pairs = p.out_features / 32, row_blocks = (p.rows + kLinearRows - 1) / kLinearRows;
  const bool split_rows = pairs < threads;
  // The tiles read kLinearRows rows: a last, partial row block is read from a zero-padded copy, made once here
  // for every thread that reads it.
  const int64_t last_row = (row_blocks - 1) * kLinearRows, last_rows = p.rows - last_row;
  std::vector<uint16_t> padded;
  if (last_rows < kLinearRows) {
    padded.assign(kLinearRows * p.in_features, 0);
    for (int64_t r = 0; r < last_rows; ++r) {
      std::memcpy(padded.data() + r * p.in_features, x + (last_row + r) * p.x_stride,
                  sizeof(uint16_t) * p.in_features);
    }
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t items = split_rows ? row_blocks : pairs, share = (items + team - 1) / team;
    const int64_t first = me * share < items ? me * share : items;
    const int64_t last = first + share < items ? first + share : items;
    for (int64_t block = split_rows ? first : 0; block < (split_rows ? last : row_blocks); ++block) {
      const int64_t row = block * kLinearRows, rows = p.rows - row < kLinearRows ? p.rows - row : kLinearRows;
      const bool partial = rows < kLinearRows;
      const uint16_t* a = partial ? padded.data() : x + row * p.x_stride;
      const int64_t a_stride = partial ? p.in_features : p.x_stride;
      if (split_rows) {
        linear_rows_amx(p, a, a_stride, row, rows, 0, pairs);
      } else if (first < last) {
        linear_rows_amx(p, a, a_stride, row, rows, first, last);
      }
    }
  }
}

// Without tiles: each thread takes a share of the panels (where they split evenly across the threads) or else of
// the rows. It runs its rows in chunks whose part of x stays in L2 (a chunk of a few hundred KiB) through all its
// panels, which stay in L2 across the chunks; while it computes a panel it fetches its next one.
void forward_panels(const LinearProblem& p, int threads) {
  constexpr int64_t kChunkBytes = 256 * 1024;
  const int64_t elem = element_size(p.dtype);
  const auto rows_of_panel = p.dtype == kFloat32 ? linear_rows_f32 : linear_rows_bf16;
  const int64_t panels = (p.out_features + kLinearPanel - 1) / kLinearPanel;
  const int64_t groups = (p.rows + kLinearPanelRows - 1) / kLinearPanelRows;  // of kLinearPanelRows rows
  const bool split_panels = panels % threads == 0;
  int64_t chunk = kChunkBytes / (elem * p.in_features) / kLinearPanelRows * kLinearPanelRows;
  chunk = chunk < kLinearPanelRows ? kLinearPanelRows : chunk;
  const char* packed = static_cast<const char*>(p.packed);
  const int64_t panel_bytes = elem * p.in_features * kLinearPanel;
#pragma omp parallel num_threads(threads)
  {
    const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t items = split_panels ? panels : groups, share = (items + team - 1) / team;
    const int64_t first = me * share < items ? me * share : items;
    const int64_t last = first + share < items ? first + share : items;
    const int64_t first_panel = split_panels ? first : 0, last_panel = split_panels ? last : panels;
    const int64_t first_row = split_panels ? 0 : first * kLinearPanelRows;
    const int64_t last_row = last * kLinearPanelRows < p.rows ? last * kLinearPanelRows : p.rows;
    const int64_t end_row = split_panels ? p.rows : last_row;
    for (int64_t row = first_row; row < end_row; row += chunk) {
      const int64_t rows = end_row - row < chunk ? end_row - row : chunk;
      for (int64_t panel = first_panel; panel < last_panel; ++panel) {
        const bool next = panel + 1 < last_panel;
        rows_of_panel(p, row, rows, panel, next ? packed + (panel + 1) * panel_bytes : nullptr);
      }
    }
  }
}

}  // namespace

void linear_forward_cpu(const LinearProblem& p, Isa isa, int threads) {
  if (p.dtype != kBFloat16 && p.dtype != kFloat32) {
    throw std::invalid_argument("the linear kernels take bfloat16 or float32");
  }
  if (isa != Isa::kAmx && isa != Isa::kAvx512) {
    throw std::invalid_argument(std::string("the linear kernels run with amx or avx512, not ") + isa_name(isa));
  }
  cpu_kernels(isa);  // std::invalid_argument where this CPU (or the OS) cannot run isa
  threads = threads < 1 ? 1 : threads;
  if (p.dtype == kBFloat16 && isa == Isa::kAmx) return forward_amx(p, threads);
  if (p.dtype == kBFloat16 && !avx512_bf16_supported()) {
    throw std::invalid_argument("this CPU has no AVX512-BF16 instructions for the bfloat16 linear");
  }
  forward_panels(p, threads);
}

}  // namespace t2t
