// The bfloat16 AVX512-BF16 code of the linear of linear_cpu.h (linear_rows_bf16; the threads in linear_cpu.cpp), for
// CPUs without AMX tiles. It reads the weight as the AMX kernel packs it: per block of 16 output features, for each
// pair of inputs, the 16 features' two weights side by side (one vector), pairs in order, so a panel of 64 features
// is 4 blocks of 16 x K elements. Everything with external linkage is included before the target pragma (see
// cpu_vector.h).
#include <immintrin.h>

#include <cstdint>

#include "linear_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi2")
#endif

#define T2T_VECTOR_BYTES 64
#define T2T_VECTOR_REGISTERS 32

namespace t2t {
namespace linear_bf16 {
#include "cpu_vector.h"
#include "avx512_math.h"

namespace {

// Rows [0, R) of a: R x V float32 accumulators of bf16 pair products (vdpbf16ps) over the K / 2 input pairs (per
// pair one broadcast of each row's two inputs and V loads of the panel's weights), then bias, GELU and the bf16
// outputs of the V x 16 features. Each step also asks for one cache line of `prefetch` (the thread's next panel)
// while lines are left.
template <int R, int V>
void rows_block(const LinearProblem& p, const uint16_t* a, const uint16_t* panel, const uint16_t* bias, uint16_t* y,
                const char* prefetch, int64_t prefetch_lines) {
  const int64_t pairs = p.in_features / 2, a_stride = p.x_stride, block = 16 * p.in_features;
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < pairs; ++k) {
    __m512bh w[V];
    for (int v = 0; v < V; ++v) w[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel + v * block + 32 * k));
    if (k < prefetch_lines) _mm_prefetch(prefetch + 64 * k, _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      uint32_t inputs;
      __builtin_memcpy(&inputs, a + r * a_stride + 2 * k, sizeof(inputs));
      const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(inputs)));
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, w[v]);
    }
  }
  // the epilogue from memory: with the accumulators live, the GELU's temporaries would spill
  alignas(64) float sums[R * V * 16];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) _mm512_store_ps(sums + (r * V + v) * 16, acc[r][v]);
  }
  store_bf16_outputs<V>(sums, V * 16, R, bias, p.gelu, y, p.out_features);
}

// A panel's rows block of R rows (R < kLinearPanelRows for the last, partial block) and V vectors (4, or 2 in a
// last panel of 32 features).
template <int R, int V>
void rows_tail(int64_t rows, const LinearProblem& p, const uint16_t* a, const uint16_t* panel, const uint16_t* bias,
               uint16_t* y) {
  if constexpr (R > 0) {
    if (rows == R) return rows_block<R, V>(p, a, panel, bias, y, nullptr, 0);
    rows_tail<R - 1, V>(rows, p, a, panel, bias, y);
  }
}

template <int V>
void panel_rows(const LinearProblem& p, int64_t row, int64_t rows, const uint16_t* weights, const uint16_t* bias,
                int64_t column, const void* next_panel) {
  constexpr int64_t R = kLinearPanelRows;
  const NextPanelLines prefetch(2 * p.in_features * kLinearPanel, rows, next_panel != nullptr);
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  uint16_t* y = static_cast<uint16_t*>(p.y);
  int64_t r = 0;
  for (int64_t b = 0; r + R <= rows; r += R, ++b) {
    rows_block<R, V>(p, x + (row + r) * p.x_stride, weights, bias, y + (row + r) * p.out_features + column,
                     static_cast<const char*>(next_panel) + 64 * prefetch.first(b), prefetch.count(b));
  }
  rows_tail<R - 1, V>(rows - r, p, x + (row + r) * p.x_stride, weights, bias, y + (row + r) * p.out_features + column);
}

}  // namespace

}  // namespace linear_bf16

void linear_rows_bf16(const LinearProblem& p, int64_t row, int64_t rows, int64_t panel, const void* next_panel) {
  const uint16_t* weights = static_cast<const uint16_t*>(p.packed) + panel * p.in_features * kLinearPanel;
  const uint16_t* bias = p.bias == nullptr ? nullptr : static_cast<const uint16_t*>(p.bias) + panel * kLinearPanel;
  const int64_t column = panel * kLinearPanel;
  if (p.out_features - column >= kLinearPanel) {
    linear_bf16::panel_rows<4>(p, row, rows, weights, bias, column, next_panel);
  } else {
    linear_bf16::panel_rows<2>(p, row, rows, weights, bias, column, next_panel);  // features: multiples of 32
  }
}

}  // namespace t2t
