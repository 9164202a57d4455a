// The AMX tile code of the linear of linear_cpu.h (linear_rows_amx; the threads in linear_cpu.cpp). Everything
// with external linkage is included before the target pragma (see cpu_vector.h).
#include <immintrin.h>

#include <cstdint>

#include "linear_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi2,amx-tile,amx-bf16")
#endif

#define T2T_VECTOR_BYTES 64
#define T2T_VECTOR_REGISTERS 32

namespace t2t {
namespace amx_linear {
#include "cpu_vector.h"
#include "amx_tiles.h"
#include "avx512_math.h"

namespace {

constexpr int64_t kRows = kLinearRows;
constexpr int64_t kTileElements = 512;

// Output rows [row, row + rows) x features [32 pair, 32 pair + 32): the products over K on the tiles, then bias,
// GELU and the bf16 rounding from float32. a: the kRows rows (a_stride elements apart, zero past `rows`).
void block(const LinearProblem& p, const uint16_t* a, int64_t a_stride, int64_t row, int64_t rows, int64_t pair,
           float* acc) {
  const int64_t steps = p.in_features / 32;
  const uint16_t* b0 = static_cast<const uint16_t*>(p.packed) + 2 * pair * steps * kTileElements;
  const uint16_t* b1 = b0 + steps * kTileElements;
  zero_products();
  for (int64_t s = 0; s < steps; ++s) {
    product_step(a + 32 * s, a + 16 * a_stride + 32 * s, 2 * a_stride, b0 + s * kTileElements,
                 b1 + s * kTileElements, 64);
  }
  store_products(acc, 32);
  const int64_t column = 32 * pair;
  const uint16_t* bias = static_cast<const uint16_t*>(p.bias);
  store_bf16_outputs<2>(acc, 32, rows, bias == nullptr ? nullptr : bias + column, p.gelu,
                     static_cast<uint16_t*>(p.y) + row * p.out_features + column, p.out_features);
}

}  // namespace

}  // namespace amx_linear

void linear_rows_amx(const LinearProblem& p, const uint16_t* a, int64_t a_stride, int64_t row, int64_t rows,
                     int64_t first_pair, int64_t last_pair) {
  alignas(64) float acc[amx_linear::kRows * 32];
  amx_linear::load_tile_config();
  for (int64_t pair = first_pair; pair < last_pair; ++pair) amx_linear::block(p, a, a_stride, row, rows, pair, acc);
  _tile_release();
}

}  // namespace t2t
