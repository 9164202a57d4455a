// Float vectors in GCC vector extensions, for the kernels of cpu_kernels.inc: T2T_VECTOR_BYTES wide (64 for
// AVX-512, 32 for AVX2, 16 for SSE), with T2T_VECTOR_REGISTERS registers of that width (32 or 16).
//
// No include guard and internal linkage only: cpu_kernels_<isa>.cpp defines both macros and includes this once
// per ISA namespace after its `#pragma GCC target`, so the same source becomes zmm, ymm or xmm code. Nothing here may call an
// inline function or template with external linkage (a std:: one, or one of another header): its copy compiled
// for AVX-512 could be the one the linker keeps for every caller.

#pragma GCC diagnostic ignored "-Wpsabi"  // vectors pass between inlined static functions only

typedef float Vec __attribute__((vector_size(T2T_VECTOR_BYTES)));
typedef int32_t VecI __attribute__((vector_size(T2T_VECTOR_BYTES)));
typedef uint32_t VecU __attribute__((vector_size(T2T_VECTOR_BYTES)));
typedef uint16_t VecH __attribute__((vector_size(T2T_VECTOR_BYTES / 2)));

constexpr int64_t kLanes = T2T_VECTOR_BYTES / 4;
constexpr int kVectorRegisters = T2T_VECTOR_REGISTERS;

// A broadcast: s - (+0) is s for every s, so GCC emits the broadcast alone (Vec{} + s would add +0.0 first, which
// turns -0.0 into +0.0; an element-wise fill becomes a chain of inserts).
static inline Vec splat(float s) { return s - Vec{}; }
static inline Vec load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
static inline void store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof(v)); }

// bfloat16 <-> float32 (round to nearest even; NaN stays NaN), as the scalar versions in restructurize_unfold.h.
static inline Vec load_bf16(const uint16_t* p) {
  VecH h;
  __builtin_memcpy(&h, p, sizeof(h));
  return reinterpret_cast<Vec>(__builtin_convertvector(h, VecU) << 16);
}
#ifdef T2T_BF16_PAIRS
// One vcvtneps2bf16, which also flushes float32 denormals (below 2^-126) to zeros of their sign.
static inline VecH to_bf16_bits(Vec v) {
  return reinterpret_cast<VecH>(_mm512_cvtneps_pbh(reinterpret_cast<__m512>(v)));
}
#else
static inline VecH to_bf16_bits(Vec v) {
  const VecU u = reinterpret_cast<VecU>(v);
  const VecU rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const VecU nan = (u >> 16) | 0x40u;
  const VecU bits = reinterpret_cast<VecU>(v != v ? reinterpret_cast<VecI>(nan) : reinterpret_cast<VecI>(rounded));
  return __builtin_convertvector(bits, VecH);
}
#endif
static inline void store_bf16(uint16_t* p, Vec v) {
  const VecH h = to_bf16_bits(v);
  __builtin_memcpy(p, &h, sizeof(h));
}

static inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }
static inline Vec vmin(Vec a, Vec b) { return a < b ? a : b; }
static inline float fmax_scalar(float a, float b) { return a > b ? a : b; }

// The steps of a tree reduction: log2(kLanes) shuffles instead of the chain of kLanes dependent scalar
// operations that a plain loop must compile to without -ffast-math. swap_lanes<d>: lane i takes lane i ^ d.
template <int... I>
struct LaneIndices {};
template <int N, int... I>
struct MakeLaneIndices : MakeLaneIndices<N - 1, N - 1, I...> {};
template <int... I>
struct MakeLaneIndices<0, I...> {
  using type = LaneIndices<I...>;
};

template <int Distance, int... I>
static inline Vec swap_lanes(Vec v, LaneIndices<I...>) {
  return __builtin_shufflevector(v, v, (I ^ Distance)...);
}

// combine(v, swap_lanes<d>(v)) for d = kLanes / 2, ..., 1: every lane then holds the reduction of all lanes.
template <int Distance = kLanes / 2, typename Combine>
static inline Vec tree_reduce(Vec v, Combine combine) {
  v = combine(v, swap_lanes<Distance>(v, typename MakeLaneIndices<kLanes>::type{}));
  if constexpr (Distance > 1) return tree_reduce<Distance / 2>(v, combine);
  return v;
}

static inline float reduce_add(Vec v) {
  return tree_reduce(v, [](Vec a, Vec b) { return a + b; })[0];
}
static inline float reduce_max(Vec v) { return tree_reduce(v, vmax)[0]; }

// Lanes i < n set, as a select mask.
static inline VecI lanes_below(int64_t n) {
  VecI index;
  for (int i = 0; i < kLanes; ++i) index[i] = i;
  const int32_t bound = n < kLanes ? static_cast<int32_t>(n) : static_cast<int32_t>(kLanes);
  return index < bound;
}

// e^r for r = x - n ln2 (n the integer nearest x / ln2, |r| <= ln2/2): Cephes' expf polynomial, ln2 in two parts.
static inline Vec exp_of_remainder(Vec x, Vec n) {
  const Vec r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  Vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * (r * r) + r + 1.0f;
}

// exp(x), within 2 ulp of expf on [-87.3, 88.7]; 0 below (and for -inf), +inf above; NaN stays NaN.
// Cephes' expf: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n through the exponent bits.
static inline Vec vexp(Vec x) {
  const Vec lo = splat(-87.33654f), hi = splat(88.72283f);
  const VecI under = x < lo, over = x > hi, nan = x != x;
  const Vec input = x;
  x = vmin(vmax(x, lo), hi);
  const Vec magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const Vec shifted = x * 1.44269504088896341f + magic;
  const Vec n = shifted - magic;
  const Vec p = exp_of_remainder(x, n);
  // n is in [-126, 128]: 2^n as exponent bits, split in two factors so that n = 128 does not overflow them
  const VecI e = reinterpret_cast<VecI>(shifted) - reinterpret_cast<VecI>(magic);
  const VecI half = e >> 1;
  const Vec scale_a = reinterpret_cast<Vec>((half + 127) << 23);
  const Vec scale_b = reinterpret_cast<Vec>((e - half + 127) << 23);
  Vec result = p * scale_a * scale_b;
  result = under ? splat(0.0f) : result;
  result = over ? splat(__builtin_inff()) : result;
  return nan ? input : result;
}
