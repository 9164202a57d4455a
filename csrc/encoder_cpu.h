// The backbone's pre-norm blocks for CPU inference, a run of them in one call: per block the kernels CPU inference
// otherwise calls one at a time from Python (the packed-weight linear, the attention kernel, the residual add +
// LayerNorm), with nothing between them. bfloat16 and float32, on AVX-512 CPUs with AVX512-BF16 (which the attention
// kernel needs), with or without AMX tiles.
#pragma once

#include <cstdint>

#include "cpu_isa.h"

namespace t2t {

// A LayerNorm's float32 parameters.
struct EncoderNorm {
  const float *weight, *bias;
  float eps;
};

// One block: linear weights packed by pack_linear_weight, biases in the problem's dtype (nullptr for none).
struct EncoderBlock {
  EncoderNorm norm1;
  const void *qkv, *qkv_bias;    // (3 dim, dim)
  float scale;                   // of the attention's scores
  const void *proj, *proj_bias;  // (dim, dim)
  EncoderNorm norm2;
  const void *fc1, *fc1_bias;    // (hidden, dim), followed by the exact GELU
  const void *fc2, *fc2_bias;    // (dim, hidden)
};

struct EncoderProblem {
  int dtype;  // kBFloat16 or kFloat32 (restructurize_unfold.h); isa kAmx or kAvx512
  Isa isa;
  int64_t batch, tokens, dim, hidden, heads;  // bf16: dim and hidden multiples of 32; dim / heads a multiple of 16
  const EncoderBlock* blocks;
  int64_t count;  // >= 1
  EncoderNorm final_norm;  // the LayerNorm of the last block's output
  // (batch * tokens, dim) in dtype, contiguous. x: the residual stream into the first block, overwritten by the
  // one out of the last; h (written): final_norm of that.
  void* x;
  void* h;
  // The last block for the cls token (token 0 of each image) alone past its qkv projection (all a classifier's
  // logits depend on): x's and h's first `batch` rows then hold the cls rows, the rest is scratch.
  bool cls_only_last;
};

// The blocks in order; std::invalid_argument when this CPU (or the OS) cannot run the kernels with isa.
void encoder_forward_cpu(const EncoderProblem& p, int threads);

}  // namespace t2t
