// Softmax attention of the backbone's blocks on the CPU, for inference on CPUs with AVX-512 and BF16 dot products:
// per image and head, S = q k^T in float32, softmax(scale S), then P v, read straight from the qkv projection's
// output and written in the (B, T, H*d) layout the output projection reads. bfloat16 (dot products of bf16 pairs,
// the probabilities rounded to bf16 as the reference's are) or float32 (FMAs). With AMX tiles (Isa::kAmx), the
// bfloat16 products of a head size that is a multiple of 32 run on them, the softmax as without.
#pragma once

#include <cstdint>

#include "cpu_isa.h"

namespace t2t {

// Query rows per register tile: the scores of 12 rows x 32 keys (24 zmm accumulators) per pass over q and k.
constexpr int64_t kAttentionRows = 12;
// With AMX: query rows per pass, two tiles of 16 (each k or v tile loaded is used by both); keys padded to a
// multiple of 32, the depth of a probabilities tile.
constexpr int64_t kAttentionTileRows = 32;
constexpr int64_t kAttentionTileKeys = 32;

// The keys are gathered 16 rows at a time with 32-bit byte offsets: qkv's token stride (elements) is at most this.
constexpr int64_t kAttentionMaxTokenStride = (int64_t{1} << 31) / 64 - 1;

struct AttentionProblem {
  int dtype;                               // of qkv and out: kFloat32 or kBFloat16 (restructurize_unfold.h)
  int64_t batch, tokens, heads, head_dim;  // B, T, H, d (d a multiple of 16)
  // element i of q, k, v (part 0, 1, 2) of head h, token t, image b at
  // [b * stride_b + t * stride_t + (part * heads + h) * head_dim + i]: the (B, T, 3, H, d) view of qkv
  const void* qkv;
  int64_t stride_b, stride_t;
  float scale;  // > 0: softmax(scale q k^T)
  void* out;    // (B, T, H * d) contiguous
};

// Per-thread scratch of attention_head (laid out by the caller from keys_pad = T rounded up to 16, with tiles to
// kAttentionTileKeys; `rows` below is kAttentionRows, with tiles kAttentionTileRows).
struct AttentionWork {
  int64_t keys_pad;
  // bfloat16: (d/2, keys_pad) pairs (k[t, 2i], k[t, 2i + 1]); float32: (d, keys_pad) k^T; zero past T
  void* keys;
  uint32_t* v_pairs;  // bfloat16 only: (keys_pad/2, d) pairs (v[2j, i], v[2j + 1, i]), zero past T
  float* scores;      // (rows, keys_pad)
  void* probs;        // (rows, keys_pad) unnormalised probabilities in the dtype, zero past T
  uint16_t* q_rows;   // tiles only: (rows, d) the last query rows of a head, zero past T
  float* out_rows;    // tiles only: (rows, d) P v before the normalisation
};

// Whether the forward takes AMX tiles for this problem with `isa`: kAmx, bfloat16, head size a multiple of 32.
bool attention_uses_tiles(const AttentionProblem& p, Isa isa);

// The attention forward with `isa` (kAmx or kAvx512); std::invalid_argument when this CPU cannot run it.
void attention_forward_cpu(const AttentionProblem& p, Isa isa, int threads);

namespace avx512_bf16 {
// Query rows [first, first + count) of head `head` of image `image` (the orchestration in attention_cpu.cpp).
void attention_head(const AttentionProblem& p, int64_t image, int64_t head, int64_t first, int64_t count,
                    const AttentionWork& work);
// The same in bfloat16 with AMX tiles (attention_uses_tiles).
void attention_head_tiles(const AttentionProblem& p, int64_t image, int64_t head, int64_t first, int64_t count,
                          const AttentionWork& work);
}  // namespace avx512_bf16

}  // namespace t2t
