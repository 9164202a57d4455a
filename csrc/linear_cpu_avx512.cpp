// The float32 AVX-512 code of the linear of linear_cpu.h (linear_rows_f32; the threads in linear_cpu.cpp).
// Everything with external linkage is included before the target pragma (see cpu_vector.h).
#include <immintrin.h>

#include <cstdint>

#include "linear_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2")
#endif

#define T2T_VECTOR_BYTES 64
#define T2T_VECTOR_REGISTERS 32

namespace t2t {
namespace linear_f32 {
#include "cpu_vector.h"
#include "avx512_math.h"

namespace {

constexpr int64_t kVectors = kLinearPanel / 16;

// The first min(left, 16) lanes.
inline __mmask16 lanes(int64_t left) { return left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1u); }

// Rows [0, R) of a: R x 4 float32 accumulators over the panel's K inputs (per input one broadcast of each row's
// element and 4 loads of the panel's weights), then bias, GELU and the stores of the `columns` valid outputs. Each
// step also asks for one cache line of `prefetch` (the thread's next panel) while lines are left.
template <int R>
void rows_block(const LinearProblem& p, const float* a, const float* panel, const float* bias, float* y,
                int64_t columns, const char* prefetch, int64_t prefetch_lines) {
  const int64_t depth = p.in_features, a_stride = p.x_stride;
  Vec acc[R][kVectors];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < kVectors; ++v) acc[r][v] = splat(0.0f);
  }
  for (int64_t k = 0; k < depth; ++k) {
    const float* weights = panel + k * kLinearPanel;
    Vec w[kVectors];
    for (int v = 0; v < kVectors; ++v) w[v] = load(weights + 16 * v);
    if (k < prefetch_lines) _mm_prefetch(prefetch + 64 * k, _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      const Vec x = splat(a[r * a_stride + k]);
      for (int v = 0; v < kVectors; ++v) acc[r][v] += x * w[v];
    }
  }
  for (int v = 0; v < kVectors && 16 * v < columns; ++v) {
    const Vec b = bias == nullptr ? splat(0.0f) : _mm512_maskz_loadu_ps(lanes(columns - 16 * v), bias + 16 * v);
    for (int r = 0; r < R; ++r) {
      _mm512_mask_storeu_ps(y + r * p.out_features + 16 * v, lanes(columns - 16 * v), acc[r][v] + b);
    }
  }
  // the GELU once the accumulators are stored (with them live, its temporaries would spill), on rows still in L1
  if (p.gelu) {
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < kVectors && 16 * v < columns; ++v) {
        float* out = y + r * p.out_features + 16 * v;
        const __mmask16 valid = lanes(columns - 16 * v);
        _mm512_mask_storeu_ps(out, valid, gelu<true>(_mm512_maskz_loadu_ps(valid, out)));
      }
    }
  }
}

template <int R>
void rows_tail(int64_t rows, const LinearProblem& p, const float* a, const float* panel, const float* bias, float* y,
               int64_t columns) {
  if constexpr (R > 0) {
    if (rows == R) return rows_block<R>(p, a, panel, bias, y, columns, nullptr, 0);
    rows_tail<R - 1>(rows, p, a, panel, bias, y, columns);
  }
}

}  // namespace

}  // namespace linear_f32

void linear_rows_f32(const LinearProblem& p, int64_t row, int64_t rows, int64_t panel, const void* next_panel) {
  using linear_f32::rows_block;
  constexpr int64_t R = kLinearPanelRows;
  const float* weights = static_cast<const float*>(p.packed) + panel * p.in_features * kLinearPanel;
  const float* bias = p.bias == nullptr ? nullptr : static_cast<const float*>(p.bias) + panel * kLinearPanel;
  const int64_t column = panel * kLinearPanel;
  const int64_t columns = p.out_features - column < kLinearPanel ? p.out_features - column : kLinearPanel;
  const NextPanelLines prefetch(4 * p.in_features * kLinearPanel, rows, next_panel != nullptr);
  const float* x = static_cast<const float*>(p.x);
  float* y = static_cast<float*>(p.y);
  int64_t r = 0;
  for (int64_t b = 0; r + R <= rows; r += R, ++b) {
    rows_block<R>(p, x + (row + r) * p.x_stride, weights, bias, y + (row + r) * p.out_features + column, columns,
                  static_cast<const char*>(next_panel) + 64 * prefetch.first(b), prefetch.count(b));
  }
  linear_f32::rows_tail<R - 1>(rows - r, p, x + (row + r) * p.x_stride, weights, bias,
                               y + (row + r) * p.out_features + column, columns);
}

}  // namespace t2t
