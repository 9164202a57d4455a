// Threads of the AMX linear (linear_cpu_amx.cpp) and the weight packing.
#include "linear_cpu.h"

#include <omp.h>

#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu_isa.h"

namespace t2t {

void pack_linear_weight(const uint16_t* w, int64_t out_features, int64_t in_features, uint16_t* packed) {
  const int64_t steps = in_features / 32;
  for (int64_t block = 0; block < out_features / 16; ++block) {
    for (int64_t s = 0; s < steps; ++s) {
      uint16_t* tile = packed + (block * steps + s) * 512;
      for (int64_t pair = 0; pair < 16; ++pair) {
        for (int64_t column = 0; column < 16; ++column) {
          const uint16_t* source = w + (16 * block + column) * in_features + 32 * s + 2 * pair;
          tile[(pair * 16 + column) * 2] = source[0];
          tile[(pair * 16 + column) * 2 + 1] = source[1];
        }
      }
    }
  }
}

// Threads split the output features (each keeps its share of W in cache across the row blocks); with fewer feature
// pairs than threads, the row blocks.
void linear_forward_amx(const LinearProblem& p, int threads) {
  if (best_cpu_isa() != Isa::kAmx) throw std::invalid_argument("this CPU (or the OS) gives no AMX tiles");
  threads = threads < 1 ? 1 : threads;
  const int64_t pairs = p.out_features / 32, row_blocks = (p.rows + kLinearRows - 1) / kLinearRows;
  const bool split_rows = pairs < threads;
  // The tiles read kLinearRows rows: a last, partial row block is read from a zero-padded copy, made once here
  // for every thread that reads it.
  const int64_t last_row = (row_blocks - 1) * kLinearRows, last_rows = p.rows - last_row;
  std::vector<uint16_t> padded;
  if (last_rows < kLinearRows) {
    padded.assign(kLinearRows * p.in_features, 0);
    for (int64_t r = 0; r < last_rows; ++r) {
      std::memcpy(padded.data() + r * p.in_features, p.x + (last_row + r) * p.x_stride,
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
      const uint16_t* a = partial ? padded.data() : p.x + row * p.x_stride;
      const int64_t a_stride = partial ? p.in_features : p.x_stride;
      if (split_rows) {
        linear_rows_amx(p, a, a_stride, row, rows, 0, pairs);
      } else if (first < last) {
        linear_rows_amx(p, a, a_stride, row, rows, first, last);
      }
    }
  }
}

}  // namespace t2t
