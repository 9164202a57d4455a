// Register-tile products of the units with AVX512-BF16 (the attention kernel's, the FAVOR+ kernels'): rows of a
// broadcast against vectors of b, in bfloat16 pairs (vdpbf16ps) or float32 (FMA).
//
// No include guard and internal linkage only, as cpu_vector.h: included once per unit, inside its namespace, after
// its `#pragma GCC target` (with avx512bf16).

template <int N>
struct Count {
  static constexpr int value = N;
};

// f(Count<n>{}) for a run-time n in [1, N]: the register tiles' sizes are compile-time constants.
template <int N, typename F>
static inline void with_count(int64_t n, F&& f) {
  if constexpr (N > 1) {
    if (n < N) return with_count<N - 1>(n, f);
  }
  f(Count<N>{});
}

static inline uint32_t load_pair(const uint16_t* p) {
  uint32_t u;
  __builtin_memcpy(&u, p, sizeof(u));
  return u;
}

static inline __m512bh as_bf16_pairs(__m512i v) { return (__m512bh)v; }

// A register tile in both dtypes: for R rows and 16 NV columns,
// acc[r][c] = sum over steps i of a[r * a_stride + i] (broadcast) times b[i * ldb + 16 c ..]. In bfloat16 a step is
// a pair of elements (a's pairs as 32-bit words, b packed in pairs: vdpbf16ps), in float32 one element (FMA).
// store(r, c, acc[r][c]) takes the results.
template <int R, int NV, typename T, typename Store>
static inline void product_tile(const T* a, int64_t a_stride, int64_t steps, const T* b, int64_t ldb, Store&& store) {
  constexpr int64_t kStep = 4 / sizeof(T);  // elements of a per step
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < steps; ++i) {
    __m512 columns[NV];
    for (int c = 0; c < NV; ++c) columns[c] = _mm512_loadu_ps(b + kStep * (i * ldb + 16 * c));
    for (int r = 0; r < R; ++r) {
      const T* element = a + r * a_stride + kStep * i;
      if constexpr (sizeof(T) == 2) {
        const __m512bh pair = as_bf16_pairs(_mm512_set1_epi32(static_cast<int>(load_pair(element))));
        for (int c = 0; c < NV; ++c) {
          acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pair, as_bf16_pairs(_mm512_castps_si512(columns[c])));
        }
      } else {
        const __m512 value = _mm512_set1_ps(*element);
        for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(value, columns[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < NV; ++c) store(r, 16 * c, acc[r][c]);
  }
}

// product_tile over `columns` columns (a multiple of 16) in blocks of up to MaxVectors vectors; store(r, column,
// acc).
template <int R, int MaxVectors, typename T, typename Store>
static void product_rows(const T* a, int64_t a_stride, int64_t steps, const T* b, int64_t ldb, int64_t columns,
                         Store&& store) {
  constexpr int64_t kStep = 4 / sizeof(T);
  for (int64_t c = 0; c < columns; c += 16 * MaxVectors) {
    with_count<MaxVectors>((columns - c) / 16, [&](auto vectors) {
      product_tile<R, decltype(vectors)::value>(a, a_stride, steps, b + kStep * c, ldb,
                                                [&](int r, int64_t column, __m512 acc) { store(r, c + column, acc); });
    });
  }
}
