// Float maths of the AVX-512 translation units (the attention kernel's, the linears'): exp and exp2 of non-positive
// arguments, the exact GELU, on the Vec of cpu_vector.h, and the bfloat16 linears' epilogue.
//
// No include guard and internal linkage only, as cpu_vector.h: included once per unit, inside its namespace, after
// its `#pragma GCC target` (with avx512f) and cpu_vector.h.

// 2^t for t <= 0: 0 below -125 (and for -inf), NaN stays NaN; within 3e-6 relative of exp2f. t = n + f, n an
// integer, |f| <= 1/2, 2^f by its degree-5 Taylor polynomial, times 2^n by vscalefps. Results stay normal numbers
// (a denormal one would cost a microcode assist in the sums that take it).
static inline Vec exp2_nonpositive(Vec t) {
  const __mmask16 keep = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-125.0f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec f = t - n;
  Vec p = splat(1.3333558146428443e-3f);  // (ln 2)^k / k!, k = 5 .. 0
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 0.24022650695910071f;
  p = p * f + 0.69314718055994531f;
  p = p * f + 1.0f;
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// e^x for x <= 0, within 2 ulp of expf: 0 below -87.3 (and for -inf), NaN stays NaN. x = n ln2 + r, |r| <= ln2/2,
// e^r by exp_of_remainder (as vexp of cpu_vector.h), times 2^n by vscalefps (half of vexp's instructions).
static inline Vec exp_nonpositive(Vec x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(x * 1.44269504088896341f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_maskz_scalef_ps(keep, exp_of_remainder(x, n), n);
}

// The exact GELU, x (1 + erf(x / sqrt 2)) / 2, with erf by Abramowitz and Stegun 7.1.26 (|error| <= 1.5e-7, as
// oneDNN's GELU takes it) and its reciprocal by rcp14 and one Newton step. Its exp: for a float32 result
// exp_nonpositive (2 ulp); for one rounded to bfloat16, exp2_nonpositive (3e-6 relative, far below that rounding,
// in fewer instructions).
template <bool kFloat32Result>
static inline Vec gelu(Vec x) {
  const Vec z = x * 0.70710678118654752f;
  const Vec az = _mm512_abs_ps(z);
  const Vec d = 1.0f + 0.3275911f * az;
  const Vec r = _mm512_rcp14_ps(d);
  const Vec t = r * (2.0f - d * r);
  Vec p = splat(1.061405429f);
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  p = p * t;
  const Vec gauss = kFloat32Result ? exp_nonpositive(-(az * az)) : exp2_nonpositive(-(az * az) * 1.44269504088896341f);
  const Vec erf_abs = 1.0f - p * gauss;
  const Vec half = 0.5f * x;
  return half + (z < 0.0f ? -erf_abs : erf_abs) * half;
}

// The bfloat16 linears' outputs from their float32 products: y = acc + bias (bfloat16, or nullptr), then the GELU
// (kFloat32Result false) when `gelu`, rounded to bfloat16 once (RNE); `rows` rows of V x 16 features, acc's rows
// acc_stride floats apart, y's y_stride elements apart. A template: only units with AVX512-BF16 instantiate it.
template <int V>
static inline void store_bf16_outputs(const float* acc, int64_t acc_stride, int64_t rows, const uint16_t* bias,
                                      bool gelu_after, uint16_t* y, int64_t y_stride) {
  for (int v = 0; v < V; ++v) {
    const Vec b = bias == nullptr ? splat(0.0f) : load_bf16(bias + 16 * v);
    for (int64_t r = 0; r < rows; ++r) {
      Vec out = load(acc + r * acc_stride + 16 * v) + b;
      if (gelu_after) out = gelu<false>(out);
      const __m256bh h = _mm512_cvtneps_pbh(out);
      __builtin_memcpy(y + r * y_stride + 16 * v, &h, sizeof(h));
    }
  }
}
