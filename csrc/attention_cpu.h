// Softmax attention of the backbone's blocks on the CPU, for bfloat16 inference on CPUs with AVX512-BF16 dot
// products: per image and head, S = q k^T in float32, softmax(scale S) rounded to bfloat16, then P v, read
// straight from the qkv projection's output and written in the (B, T, H*d) layout the output projection reads.
#pragma once

#include <cstdint>

namespace t2t {

// Query rows per register tile: the scores of 12 rows x 32 keys (24 zmm accumulators) per pass over q and k.
constexpr int64_t kAttentionRows = 12;

// The keys are gathered 16 rows at a time with 32-bit byte offsets: qkv's token stride (elements) is at most this.
constexpr int64_t kAttentionMaxTokenStride = (int64_t{1} << 31) / 32 - 1;

struct AttentionProblem {
  int64_t batch, tokens, heads, head_dim;  // B, T, H, d (d a multiple of 16)
  // bfloat16 bits; element i of q, k, v (part 0, 1, 2) of head h, token t, image b at
  // [b * stride_b + t * stride_t + (part * heads + h) * head_dim + i]: the (B, T, 3, H, d) view of qkv
  const uint16_t* qkv;
  int64_t stride_b, stride_t;
  float scale;    // > 0: softmax(scale q k^T)
  uint16_t* out;  // (B, T, H * d) contiguous, bfloat16 bits
};

// Per-thread scratch of attention_head (filled by the caller from keys_pad = T rounded up to 16).
struct AttentionWork {
  int64_t keys_pad;
  uint32_t* k_pairs;  // (d/2, keys_pad): bfloat16 pairs (k[t, 2i], k[t, 2i + 1]), zero past T
  uint32_t* v_pairs;  // (keys_pad/2, d): pairs (v[2j, i], v[2j + 1, i]), zero past T
  float* scores;      // (kAttentionRows, keys_pad)
  uint16_t* probs;    // (kAttentionRows, keys_pad): unnormalised bfloat16 probabilities, zero past T
};

// Whether this CPU runs the kernel (AVX-512 F, BW, DQ, VL and BF16).
bool attention_bf16_supported();

// The attention forward; std::invalid_argument when this CPU cannot run it.
void attention_forward_cpu(const AttentionProblem& p, int threads);

namespace avx512_bf16 {
// Query rows [first, first + count) of head `head` of image `image` (the orchestration in attention_cpu.cpp).
void attention_head(const AttentionProblem& p, int64_t image, int64_t head, int64_t first, int64_t count,
                    const AttentionWork& work);
}  // namespace avx512_bf16

}  // namespace t2t
