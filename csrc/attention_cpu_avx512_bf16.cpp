// The attention kernel of attention_cpu.h for AVX-512 with BF16 dot products (vdpbf16ps), as
// t2t::avx512_bf16::attention_head, and its bfloat16 products on AMX tiles, as attention_head_tiles. Everything
// with external linkage is included before the target pragma (see cpu_vector.h).
#include <immintrin.h>

#include <cstdint>

#include "attention_cpu.h"
#include "restructurize_unfold.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi2,amx-tile,amx-bf16")
#endif

#define T2T_VECTOR_BYTES 64
#define T2T_VECTOR_REGISTERS 32

namespace t2t {
namespace avx512_bf16 {
#include "cpu_vector.h"
#include "amx_tiles.h"
#include "avx512_math.h"
#include "avx512_bf16_products.h"

namespace {

// Vectors of 16 columns per register tile: kAttentionRows x kTileVectors accumulators (24 of the 32 zmm).
constexpr int kTileVectors = 24 / kAttentionRows;

// The padding keys' scores (their packed k is 0) set to -inf: they drop out of the softmax.
static void mask_padding_keys(int64_t rows, int64_t keys, const AttentionWork& w) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = keys / kLanes * kLanes; c < w.keys_pad; c += kLanes) {
      float* s = w.scores + r * w.keys_pad + c;
      store(s, lanes_below(keys - c) ? load(s) : splat(-__builtin_inff()));
    }
  }
}

// R rows of scores (-inf past the keys; rows w.keys_pad apart from s) -> unnormalised probabilities
// exp(scale (s - max s)) in the dtype T of probs, and the reciprocal of each row's float32 sum. The rows' chains of
// maxima, sums and reductions are independent, which keeps the vector units busy where one row's would wait on
// their latency. bfloat16 rounds the probabilities, so exp2_nonpositive suffices there; float32 takes vexp
// (within 2 ulp of expf).
template <int R, typename T>
static inline void softmax_row_block(const float* s, T* probs, int64_t keys_pad, float scale, float* inv_sum) {
  Vec top[R];
  for (int r = 0; r < R; ++r) top[r] = load(s + r * keys_pad);
  for (int64_t c = kLanes; c < keys_pad; c += kLanes) {
    for (int r = 0; r < R; ++r) top[r] = vmax(top[r], load(s + r * keys_pad + c));
  }
  float shift[R];
  Vec sum[R];
  for (int r = 0; r < R; ++r) {
    shift[r] = reduce_max(top[r]);
    sum[r] = splat(0.0f);
  }
  for (int64_t c = 0; c < keys_pad; c += kLanes) {
    for (int r = 0; r < R; ++r) {
      const Vec x = load(s + r * keys_pad + c) - shift[r];
      if constexpr (sizeof(T) == 2) {
        const Vec e = exp2_nonpositive(x * (scale * 1.44269504088896341f));
        const __m256bh h = _mm512_cvtneps_pbh(e);
        __builtin_memcpy(probs + r * keys_pad + c, &h, sizeof(h));
        sum[r] += e;
      } else {
        const Vec e = vexp(x * scale);
        store(probs + r * keys_pad + c, e);
        sum[r] += e;
      }
    }
  }
  for (int r = 0; r < R; ++r) inv_sum[r] = 1.0f / reduce_add(sum[r]);
}

// The first `rows` rows of w.scores -> w.probs and inv_sum, kSoftmaxRows at a time.
constexpr int kSoftmaxRows = 4;

template <typename T>
static void softmax_rows(int64_t rows, float scale, const AttentionWork& w, float* inv_sum) {
  const int64_t kp = w.keys_pad;
  for (int64_t r = 0; r < rows; r += kSoftmaxRows) {
    with_count<kSoftmaxRows>(rows - r, [&](auto block) {
      softmax_row_block<decltype(block)::value>(w.scores + r * kp, static_cast<T*>(w.probs) + r * kp, kp, scale,
                                                inv_sum + r);
    });
  }
}

// The 32-bit words i < words of each key row (rows `row_bytes` apart from k) -> keys-major (words, keys_pad), zero
// past `tokens`: 16 keys at a time, one gather of their word i per i. A word is a pair of bf16 elements or one fp32.
static void gather_key_words(const char* k, int64_t row_bytes, int64_t tokens, int64_t words, const AttentionWork& w) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int>(row_bytes)));
  uint32_t* out = static_cast<uint32_t*>(w.keys);
  for (int64_t t = 0; t < w.keys_pad; t += 16) {
    const int64_t left = tokens - t;
    const __mmask16 valid = static_cast<__mmask16>(left >= 16 ? 0xffff : left <= 0 ? 0 : (1u << left) - 1u);
    const char* block = k + t * row_bytes;
    for (int64_t i = 0; i < words; ++i) {
      _mm512_storeu_si512(out + i * w.keys_pad + t,
                          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, rows, block + 4 * i, 1));
    }
  }
}

// k rows -> (d/2, keys_pad) pairs; v rows -> (keys_pad/2, d) pairs of consecutive rows; zero past `tokens`.
static void pack_keys_values(const uint16_t* k, const uint16_t* v, int64_t stride, int64_t tokens, int64_t width,
                             const AttentionWork& w) {
  gather_key_words(reinterpret_cast<const char*>(k), 2 * stride, tokens, width / 2, w);
  const VecH zero = {};
  for (int64_t j = 0; j < w.keys_pad / 2; ++j) {
    const int64_t t = 2 * j;
    for (int64_t i = 0; i < width; i += kLanes) {
      VecH first = zero, second = zero;
      if (t < tokens) __builtin_memcpy(&first, v + t * stride + i, sizeof(first));
      if (t + 1 < tokens) __builtin_memcpy(&second, v + (t + 1) * stride + i, sizeof(second));
      const VecU pair = __builtin_convertvector(first, VecU) | (__builtin_convertvector(second, VecU) << 16);
      __builtin_memcpy(w.v_pairs + j * width + i, &pair, sizeof(pair));
    }
  }
}

// ------------------------------------------------------------------------------------------------ float32

// One tile of R query rows: scores against every key, the softmax, P v normalised into out. bfloat16: k and v
// packed in pairs (`v` unused); float32: k^T packed, v read in place (rows `stride` apart).
template <int R, typename T>
static void attention_tile(const T* q, const T* v, int64_t stride, int64_t width, int64_t keys, float scale,
                           const AttentionWork& w, T* out, int64_t out_stride) {
  constexpr int64_t kStep = 4 / sizeof(T);
  product_rows<R, kTileVectors>(
      q, stride, width / kStep, static_cast<const T*>(w.keys), w.keys_pad, w.keys_pad,
      [&](int r, int64_t column, __m512 acc) { _mm512_storeu_ps(w.scores + r * w.keys_pad + column, acc); });
  float inv_sum[R];
  mask_padding_keys(R, keys, w);
  softmax_rows<T>(R, scale, w, inv_sum);
  const T* values = sizeof(T) == 2 ? reinterpret_cast<const T*>(w.v_pairs) : v;
  const int64_t ldb = sizeof(T) == 2 ? width : stride;
  product_rows<R, kTileVectors>(static_cast<const T*>(w.probs), w.keys_pad, (keys + kStep - 1) / kStep, values, ldb,
                                width, [&](int r, int64_t column, __m512 acc) {
                                  const __m512 y = _mm512_mul_ps(acc, _mm512_set1_ps(inv_sum[r]));
                                  if constexpr (sizeof(T) == 2) {
                                    const __m256bh h = _mm512_cvtneps_pbh(y);
                                    __builtin_memcpy(out + r * out_stride + column, &h, sizeof(h));
                                  } else {
                                    _mm512_storeu_ps(out + r * out_stride + column, y);
                                  }
                                });
}

// ------------------------------------------------------------------------------------------------ AMX tiles

// kAttentionTileRows query rows (q: rows q_stride elements apart, zero past `rows`): scores against every key,
// the softmax of the first `rows`, P v normalised into out; k and v packed in pairs, keys_pad a multiple of 32.
static void attention_tile_amx(const uint16_t* q, int64_t q_stride, int64_t rows, int64_t width, int64_t keys,
                               float scale, const AttentionWork& w, uint16_t* out, int64_t out_stride) {
  const uint32_t* k = static_cast<const uint32_t*>(w.keys);
  for (int64_t c = 0; c < w.keys_pad; c += 32) {
    zero_products();
    for (int64_t i = 0; i < width; i += 32) {
      const uint32_t* b = k + i / 2 * w.keys_pad + c;
      product_step(q + i, q + 16 * q_stride + i, 2 * q_stride, b, b + 16, 4 * w.keys_pad);
    }
    store_products(w.scores + c, w.keys_pad);
  }
  float inv_sum[kAttentionTileRows];
  mask_padding_keys(rows, keys, w);
  softmax_rows<uint16_t>(rows, scale, w, inv_sum);
  uint16_t* probs = static_cast<uint16_t*>(w.probs);
  __builtin_memset(probs + rows * w.keys_pad, 0, sizeof(uint16_t) * (kAttentionTileRows - rows) * w.keys_pad);
  for (int64_t c = 0; c < width; c += 32) {
    zero_products();
    for (int64_t j = 0; j < w.keys_pad; j += 32) {
      const uint32_t* b = w.v_pairs + j / 2 * width + c;
      product_step(probs + j, probs + 16 * w.keys_pad + j, 2 * w.keys_pad, b, b + 16, 4 * width);
    }
    store_products(w.out_rows + c, width);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const Vec factor = splat(inv_sum[r]);
    for (int64_t i = 0; i < width; i += kLanes) {
      const __m256bh h = _mm512_cvtneps_pbh(load(w.out_rows + r * width + i) * factor);
      __builtin_memcpy(out + r * out_stride + i, &h, sizeof(h));
    }
  }
}

}  // namespace

void attention_head(const AttentionProblem& p, int64_t image, int64_t head, int64_t first, int64_t count,
                    const AttentionWork& work) {
  const int64_t d = p.head_dim, stride = p.stride_t, out_stride = p.heads * d;
  const int64_t in = image * p.stride_b + head * d, at = (image * p.tokens) * out_stride + head * d;
  const auto rows = [&](const auto* base, auto* out) {
    const auto* v = base + 2 * p.heads * d;
    for (int64_t r = first; r < first + count; r += kAttentionRows) {
      with_count<kAttentionRows>(first + count - r, [&](auto tile) {
        attention_tile<decltype(tile)::value>(base + r * stride, v, stride, d, p.tokens, p.scale, work,
                                              out + r * out_stride, out_stride);
      });
    }
  };
  if (p.dtype == kFloat32) {
    const float* base = static_cast<const float*>(p.qkv) + in;
    gather_key_words(reinterpret_cast<const char*>(base + p.heads * d), 4 * stride, p.tokens, d, work);
    rows(base, static_cast<float*>(p.out) + at);
  } else {
    const uint16_t* base = static_cast<const uint16_t*>(p.qkv) + in;
    pack_keys_values(base + p.heads * d, base + 2 * p.heads * d, stride, p.tokens, d, work);
    rows(base, static_cast<uint16_t*>(p.out) + at);
  }
}

void attention_head_tiles(const AttentionProblem& p, int64_t image, int64_t head, int64_t first, int64_t count,
                          const AttentionWork& work) {
  const int64_t d = p.head_dim, stride = p.stride_t, out_stride = p.heads * d;
  const uint16_t* base = static_cast<const uint16_t*>(p.qkv) + image * p.stride_b + head * d;
  uint16_t* out = static_cast<uint16_t*>(p.out) + (image * p.tokens) * out_stride + head * d;
  pack_keys_values(base + p.heads * d, base + 2 * p.heads * d, stride, p.tokens, d, work);
  load_tile_config();
  for (int64_t r = first; r < first + count; r += kAttentionTileRows) {
    const int64_t rows = first + count - r < kAttentionTileRows ? first + count - r : kAttentionTileRows;
    const uint16_t* q = base + r * stride;
    int64_t q_stride = stride;
    if (rows < kAttentionTileRows) {  // a tile reads all its rows: the last ones from a zero-padded copy
      for (int64_t i = 0; i < rows; ++i) __builtin_memcpy(work.q_rows + i * d, q + i * stride, sizeof(uint16_t) * d);
      __builtin_memset(work.q_rows + rows * d, 0, sizeof(uint16_t) * (kAttentionTileRows - rows) * d);
      q = work.q_rows;
      q_stride = d;
    }
    attention_tile_amx(q, q_stride, rows, d, p.tokens, p.scale, work, out + r * out_stride, out_stride);
  }
  _tile_release();
}

}  // namespace avx512_bf16
}  // namespace t2t
